"""Inference engine benchmark: decode tokens/s by batch and compile count (speculative decoding,
which needs a trained draft and target, is measured by bench/speculative_bench.py).

    uv run python bench/engine_bench.py                 # CPU: depth 4 and 6, batch 1/8/32 (~minutes)
    uv run python bench/engine_bench.py --tokens 16     # quicker
    uv run python bench/engine_bench.py --gpu           # d12 and d20 at max_len 2048, bf16
    uv run python bench/engine_bench.py --runcpu        # nanochat's runs/runcpu.sh model, 1 and 8 samples
    uv run python bench/engine_bench.py --runcpu --nanochat   # ... interleaved with nanochat's own benchmark

--runcpu is the side-by-side with nanochat (../shared/nanochat_bench/decode.py, see its README):
depth 6, n_embd 384 (6 heads of 64), window L, sequence_len 512, vocab 32768, fp32; a 32-token
prompt, 128 new tokens, temperature 1.0, num_samples 1 and 8 of the one prompt; an Engine with its
DEFAULT settings (max_len = sequence_len, cache buckets on: the cache length it picked is printed).
tok/s = tokens generated / wall time of the whole generate call (prefill included), the median of
--repeats calls per round: nanochat's decode.py reports the same quantity (its tokens_per_s). With
--nanochat each round first runs nanochat's decode.py (a subprocess with its own warm-up, in the venv
of $NANOCHAT_VENV, source $NANOCHAT_SRC; it retrains its tokenizer every time, which is not timed),
then ours, so both see the same machine load; the table gives the medians over rounds and the
ratio of the medians. With --nanochat each round of ours runs in a fresh process (compiled before
its timed calls), so neither side holds memory while the other runs: on this kind of VM a process
merely holding a few GB resident makes the other's page faults dearer. --unbucketed adds an Engine(bucket_cache=False) (cache = max_len = 512) row.
The "matmuls only (ceiling)" row times a loop that does, per token, nothing but the model's weight
matmuls (`matmul_floor_rates`): the tok/s no decoder built on XLA:CPU's dots can beat at fp32 here.

Models have random weights (speed does not depend on them) and a stub tokenizer (vocab 8192 on CPU,
32768 on GPU; only the special-token ids matter). Decode tokens/s = generated tokens / wall time
of a second, already compiled `generate` call (greedy, no stop tokens, 16-token prompts, so prefill
is a small part).
cache = KV cache slots the engine chose (prompt + tokens rounded up to a cache bucket, at most max_len).
compiles* = cumulative decode-loop compilations of the engine (one per batch bucket and cache bucket).
GPU bandwidth utilisation = (bf16 block matrices + lm_head + the KV cache slots each step reads) *
steps/s / the chip's HBM bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# the allocator policy for long CPU runs (flaxchat/host_memory.py), before flaxchat is imported
os.environ.setdefault("FLAXCHAT_HOST_MALLOC", "keep")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.inference.engine import Engine
from flaxchat.tokenizer_specials import SPECIAL_TOKENS
from machine import cpu_description

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


class StubTokenizer:
    """Ids only: the specials take the last 9 ids, as in flaxchat's tokenizer."""

    def __init__(self, vocab_size: int):
        self.special_tokens = {name: vocab_size - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos_token_id = self.special_tokens["<|bos|>"]

    def encode_special(self, name: str) -> int:
        return self.special_tokens[name]

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids) -> str:
        return ""


def build(depth: int, vocab: int, seq: int, dtype: str):
    from flaxchat.model.gpt import GPT
    cfg = ModelConfig(depth=depth, vocab_size=vocab, sequence_len=seq, compute_dtype=dtype)
    cfg.derive()
    return GPT(cfg, nnx.Rngs(depth))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(batch)
    return [rng.integers(0, vocab - 16, 16).tolist() for _ in range(batch)]


def decode_rate(engine: Engine, batch: int, tokens: int, vocab: int) -> tuple[float, float]:
    """(compile+first call seconds, tokens/s of the second call)."""
    p = prompts(batch, vocab)
    kw = dict(max_tokens=tokens, temperature=0.0, stop_tokens=[], use_tools=False)
    first, _ = timed(lambda: engine.generate(p, **kw))
    secs, out = timed(lambda: engine.generate(p, **kw))
    return first, sum(len(c[0].tokens) for c in out) / secs


def model_bytes_per_step(model, engine: Engine, batch: int) -> float:
    """Bytes one decode step must read: bf16 block matrices and lm_head, plus every KV slot."""
    s = model.spec
    params = model.param_tree()
    blocks = sum(x.size for x in jax.tree.leaves(params["blocks"]))
    weights = (blocks + params["lm_head"].size) * s.dtype.itemsize
    cache = 2 * s.n_layer * batch * engine.last_cache_len * s.kv_dim * s.dtype.itemsize
    return weights + cache


def run(depths: list[int], batches: list[int], tokens: int, vocab: int, max_len: int, dtype: str,
        gpu: bool) -> None:
    tok = StubTokenizer(vocab)
    kind = jax.devices()[0].device_kind
    hbm = next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), None)
    print(f"device: {kind} (cpu: {cpu_description()})  dtype {dtype}  vocab {vocab}  max_len {max_len}  tokens/row {tokens}")
    print(f"{'depth':>5} {'batch':>5} {'cache':>5} {'first call s':>12} {'tok/s':>10} {'steps/s':>8} {'compiles*':>9}"
          + (f" {'GB/s':>7} {'HBM util':>8}" if gpu else ""))
    for depth in depths:
        model = build(depth, vocab, max_len, dtype)
        engine = Engine(model, tok, max_len=max_len)
        for batch in batches:
            first, rate = decode_rate(engine, batch, tokens, vocab)
            line = f"{depth:>5} {batch:>5} {engine.last_cache_len:>5} {first:>12.2f} {rate:>10.1f} {rate / batch:>8.1f} {engine.compile_count:>9}"
            if gpu:
                gbs = model_bytes_per_step(model, engine, batch) * rate / batch / 1e9
                line += f" {gbs:>7.0f} {gbs * 1e9 / hbm:>8.1%}" if hbm else f" {gbs:>7.0f} {'?':>8}"
            print(line, flush=True)


RUNCPU = dict(depth=6, aspect_ratio=64, head_dim=64, window_pattern="L", sequence_len=512, vocab_size=32768,
              compute_dtype="float32")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANOCHAT_SCRIPT = os.path.join(REPO, "..", "shared", "nanochat_bench", "decode.py")
RUNCPU_SAMPLES = [1, 8]
FLOOR = "matmuls only (ceiling)"


def runcpu_rates(engine: Engine, prompt: list[int], samples: list[int], tokens: int, repeats: int,
                 seed: int) -> dict[int, float]:
    """{num_samples: median tok/s over `repeats` generate calls} at temperature 1, default settings."""
    rates = {}
    for ns in samples:
        runs = []
        for r in range(repeats):
            secs, out = timed(lambda: engine.generate([prompt], num_samples=ns, max_tokens=tokens, temperature=1.0,
                                                      seed=seed + r))
            runs.append(sum(len(c.tokens) for c in out[0]) / secs)
        rates[ns] = statistics.median(runs)
    return rates


def nanochat_rates(python: str, script: str, samples: list[int], tokens: int, repeats: int) -> dict[int, float]:
    """One run of nanochat's decode benchmark -> {num_samples: its tokens_per_s at T=1.0}."""
    cmd = [python, script, "--num-samples", ",".join(map(str, samples)), "--temperatures", "1.0",
           "--max-tokens", str(tokens), "--prompt-tokens", "32", "--repeats", str(repeats), "--warmup", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"nanochat benchmark failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {r["num_samples"]: r["tokens_per_s"] for r in summary["results"]}


def runcpu_engines(args) -> tuple[dict[str, Engine], list[int]]:
    """The runcpu model's engines (default settings; --unbucketed adds one), compiled, and the prompt."""
    from flaxchat.model.gpt import GPT
    cfg = ModelConfig(**RUNCPU)
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(0))
    tok = StubTokenizer(cfg.vocab_size)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size - 16, 32).tolist()
    engines = {"flaxchat": Engine(model, tok)}                 # the default settings
    if args.unbucketed:
        engines["flaxchat unbucketed"] = Engine(model, tok, bucket_cache=False)
    for eng in engines.values():                                # compile outside the timed rounds
        runcpu_rates(eng, prompt, RUNCPU_SAMPLES, args.tokens or 128, 1, seed=0)
    return engines, prompt


def matmul_floor_rates(model, samples: list[int], tokens: int, repeats: int) -> dict[int, float]:
    """{rows: tok/s} of a loop that does per token only the model's weight matmuls (q, k, v, o, MLP per
    layer, then lm_head and one max over the logits), chained so XLA can neither skip nor overlap
    them: no attention, cache, norms or sampling. It reads the same fp32 weights a decode step
    must read, through the same XLA:CPU dots, so no engine built on them decodes faster: the
    ceiling the side-by-side ratios are bounded by."""
    params = model.param_tree()
    attn, mlp = params["blocks"]["attn"], params["blocks"]["mlp"]
    layers = [tuple(attn[n][i] for n in ("c_q", "c_k", "c_v", "c_proj")) + (mlp["c_fc"][i], mlp["c_proj"][i])
              for i in range(model.spec.n_layer)]

    def run(layers, head, h):
        def token(_, h):
            for q, k, v, o, fc, proj in layers:
                h = h + (h @ q + h @ k + h @ v) @ o
                h = h + jnp.square(jax.nn.relu(h @ fc)) @ proj
            return h + 1e-6 * jnp.max(h @ head, axis=-1, keepdims=True)
        return jax.lax.fori_loop(0, tokens, token, h)

    loop = jax.jit(run)
    rates = {}
    for rows in samples:
        h = jnp.full((rows, model.spec.n_embd), 0.01, jnp.float32)
        jax.block_until_ready(loop(layers, params["lm_head"], h))
        runs = [timed(lambda: jax.block_until_ready(loop(layers, params["lm_head"], h)))[0] for _ in range(repeats)]
        rates[rows] = rows * tokens / statistics.median(runs)
    return rates


def runcpu_round(engines: dict[str, Engine], prompt: list[int], args, r: int) -> dict[str, dict[int, float]]:
    rates = {name: runcpu_rates(eng, prompt, RUNCPU_SAMPLES, args.tokens or 128, args.repeats, seed=100 * r)
             for name, eng in engines.items()}
    model = next(iter(engines.values())).model
    rates[FLOOR] = matmul_floor_rates(model, RUNCPU_SAMPLES, args.tokens or 128, args.repeats)
    return rates


def runcpu_round_fresh(args, r: int) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """One round of ours in a fresh process, so it holds no memory while nanochat runs (see the docstring)."""
    cmd = [sys.executable, __file__, "--runcpu-round", str(r), "--repeats", str(args.repeats)]
    cmd += (["--tokens", str(args.tokens)] if args.tokens else []) + (["--unbucketed"] if args.unbucketed else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"flaxchat round failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: {int(ns): v for ns, v in per.items()} for name, per in got["rates"].items()}, got["cache_len"]


def runcpu(args) -> None:
    samples = RUNCPU_SAMPLES
    engines, prompt = ({}, None) if args.nanochat else runcpu_engines(args)
    cfg = ModelConfig(**RUNCPU)
    cfg.derive()
    print(f"runcpu: depth {cfg.depth} n_embd {cfg.n_embd} heads {cfg.n_head}x{cfg.head_dim} vocab {cfg.vocab_size} "
          f"seq {cfg.sequence_len} fp32, prompt 32, new {args.tokens or 128}, T=1.0, {args.rounds} rounds x "
          f"{args.repeats} calls; cpu: {cpu_description()}", flush=True)
    rows: dict[str, dict[int, list[float]]] = {}
    cache_len: dict[str, int] = {}
    for r in range(args.rounds):
        if args.nanochat:
            got = nanochat_rates(args.nanochat_python, args.nanochat_script, samples, args.tokens or 128, args.repeats)
            for ns in samples:
                rows.setdefault("nanochat", {}).setdefault(ns, []).append(got[ns])
            ours, cache_len = runcpu_round_fresh(args, r)
        else:
            ours = runcpu_round(engines, prompt, args, r)
            cache_len = {name: eng.last_cache_len for name, eng in engines.items()}
        for name, got in ours.items():
            for ns in samples:
                rows.setdefault(name, {}).setdefault(ns, []).append(got[ns])
        print(f"round {r + 1}: " + "  ".join(f"{name} {ns}:{rows[name][ns][-1]:.0f}" for name in rows for ns in samples),
              flush=True)
    print(f"\n{'engine':<22} {'cache len':>9} " + " ".join(f"{f'{ns} sample' + ('s' if ns > 1 else ''):>11}"
                                                          for ns in samples) + "   (median tok/s)")
    for name, per in rows.items():
        print(f"{name:<22} {cache_len.get(name, '-'):>9} " + " ".join(f"{statistics.median(per[ns]):>11.1f}" for ns in samples))
    if "nanochat" in rows:
        for name in (n for n in rows if n != "nanochat"):
            print(f"{name + ' / nanochat':<34} " + " ".join(
                f"{statistics.median(rows[name][ns]) / statistics.median(rows['nanochat'][ns]):>10.2f}x" for ns in samples))
    print(json.dumps({"runcpu": {name: {str(ns): per[ns] for ns in samples} for name, per in rows.items()},
                      "cache_len": cache_len}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="d12/d20, bf16, vocab 32768, max_len 2048")
    ap.add_argument("--tokens", type=int, default=None, help="tokens generated per row")
    ap.add_argument("--runcpu", action="store_true", help="nanochat's runcpu.sh model, 1 and 8 samples (docstring)")
    ap.add_argument("--nanochat", action="store_true", help="with --runcpu: interleave nanochat's decode benchmark")
    ap.add_argument("--unbucketed", action="store_true", help="with --runcpu: also an Engine(bucket_cache=False)")
    ap.add_argument("--rounds", type=int, default=3, help="with --runcpu: interleaved rounds")
    ap.add_argument("--repeats", type=int, default=3, help="with --runcpu: timed generate calls per round")
    ap.add_argument("--nanochat-python", default=os.path.join(os.environ.get("NANOCHAT_VENV", "/tmp/nanochat-venv"),
                                                              "bin", "python"))
    ap.add_argument("--nanochat-script", default=NANOCHAT_SCRIPT)
    ap.add_argument("--runcpu-round", type=int, default=None, help=argparse.SUPPRESS)   # one round, JSON (subprocess)
    args = ap.parse_args()
    if args.runcpu_round is not None:
        engines, prompt = runcpu_engines(args)
        rates = runcpu_round(engines, prompt, args, args.runcpu_round)
        print(json.dumps({"rates": rates, "cache_len": {n: e.last_cache_len for n, e in engines.items()}}))
    elif args.runcpu:
        runcpu(args)
    elif args.gpu:
        tokens = args.tokens or 256
        run([12, 20], [1, 8, 32], tokens, 32768, 2048, "bfloat16", gpu=True)
    else:
        tokens = args.tokens or 32
        run([4, 6], [1, 8, 32], tokens, 8192, 128, "float32", gpu=False)


if __name__ == "__main__":
    main()
