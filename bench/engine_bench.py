"""Inference engine benchmark: decode tokens/s by batch and compile count (speculative decoding,
which needs a trained draft and target, is measured by bench/speculative_bench.py).

    uv run python bench/engine_bench.py                 # CPU: depth 4 and 6, batch 1/8/32 (~minutes)
    uv run python bench/engine_bench.py --tokens 16     # quicker
    uv run python bench/engine_bench.py --gpu           # d12 and d20 at max_len 2048, bf16

Models have random weights (speed does not depend on them) and a stub tokenizer (vocab 8192 on CPU,
32768 on GPU; only the special-token ids matter). Decode tokens/s = generated tokens / wall time
of a second, already compiled `generate` call (greedy, no stop tokens, 16-token prompts, so prefill
is a small part).
compiles* = cumulative decode-loop compilations of the engine (one per batch bucket).
GPU bandwidth utilisation = (bf16 block matrices + lm_head + the KV cache slots each step reads) *
steps/s / the chip's HBM bandwidth.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.inference.engine import Engine
from flaxchat.tokenizer_specials import SPECIAL_TOKENS

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
    cache = 2 * s.n_layer * batch * engine.max_len * s.kv_dim * s.dtype.itemsize
    return weights + cache


def run(depths: list[int], batches: list[int], tokens: int, vocab: int, max_len: int, dtype: str,
        gpu: bool) -> None:
    tok = StubTokenizer(vocab)
    kind = jax.devices()[0].device_kind
    hbm = next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), None)
    print(f"device: {kind}  dtype {dtype}  vocab {vocab}  max_len {max_len}  tokens/row {tokens}")
    print(f"{'depth':>5} {'batch':>5} {'first call s':>12} {'tok/s':>10} {'steps/s':>8} {'compiles*':>9}"
          + (f" {'GB/s':>7} {'HBM util':>8}" if gpu else ""))
    for depth in depths:
        model = build(depth, vocab, max_len, dtype)
        engine = Engine(model, tok, max_len=max_len)
        for batch in batches:
            first, rate = decode_rate(engine, batch, tokens, vocab)
            line = f"{depth:>5} {batch:>5} {first:>12.2f} {rate:>10.1f} {rate / batch:>8.1f} {engine.compile_count:>9}"
            if gpu:
                gbs = model_bytes_per_step(model, engine, batch) * rate / batch / 1e9
                line += f" {gbs:>7.0f} {gbs * 1e9 / hbm:>8.1%}" if hbm else f" {gbs:>7.0f} {'?':>8}"
            print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="d12/d20, bf16, vocab 32768, max_len 2048")
    ap.add_argument("--tokens", type=int, default=None, help="tokens generated per row")
    args = ap.parse_args()
    if args.gpu:
        tokens = args.tokens or 256
        run([12, 20], [1, 8, 32], tokens, 32768, 2048, "bfloat16", gpu=True)
    else:
        tokens = args.tokens or 32
        run([4, 6], [1, 8, 32], tokens, 8192, 128, "float32", gpu=False)


if __name__ == "__main__":
    main()
