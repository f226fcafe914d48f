"""Throughput of the FULL pretrain step (forward, backward, grad accumulation, Muon+AdamW update).

This is the train step the pretrain stage runs (flaxchat.train.loop.make_train_step), on random
tokens so no tokenizer or data is needed. Prints one row per config: compile seconds, median
step seconds, tokens/s and MFU (nanochat's FLOPs/token against the chip's bf16 peak).

    uv run python bench/pretrain_bench.py                       # CPU: nanochat's CPU config
    uv run python bench/pretrain_bench.py --gpu                 # GPU: d12 and d20 at T=2048, bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.config import MeshConfig, ModelConfig, TrainConfig
from flaxchat.model.flops import estimate_flops, mfu
from flaxchat.mesh import create_sharded, create_sharded_optimizer, make_mesh, mesh_context
from flaxchat.model.gpt import GPT
from flaxchat.optim import build_optimizer
from flaxchat.train.loop import _global, make_train_step


def bench(depth: int, head_dim: int, window: str, seq: int, batch: int, accum: int, steps: int,
          vocab: int, dtype: str, remat: str) -> dict:
    mcfg = ModelConfig(depth=depth, head_dim=head_dim, window_pattern=window, sequence_len=seq,
                       vocab_size=vocab, compute_dtype=dtype, remat=remat)
    mcfg.derive()
    mesh_cfg = MeshConfig(data=-1, fsdp=1, tensor=1, rules="fsdp")
    mesh = make_mesh(mesh_cfg)
    with mesh_context(mesh, mesh_cfg.rules):
        model = create_sharded(lambda: GPT(mcfg, rngs=nnx.Rngs(0)), mesh, mesh_cfg.rules)
        tx = build_optimizer(TrainConfig(), mcfg, num_steps=1000)
        optimizer = create_sharded_optimizer(model, tx, mesh, mesh_cfg.rules)
        step_fn = make_train_step(model, optimizer, lambda m, b: m(b["inputs"], b["targets"]))
        rows = batch * jax.device_count()
        rng = np.random.default_rng(0)
        host = {k: rng.integers(0, vocab, (accum, rows, seq), dtype=np.int32) for k in ("inputs", "targets")}
        data = _global(host, mesh)
        state = nnx.state((model, optimizer))
        bad = jnp.asarray(-1, jnp.int32)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, data, jnp.asarray(0, jnp.int32), bad).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(steps + 2):
            t = time.perf_counter()
            state, loss, bad = compiled(state, data, jnp.asarray(i, jnp.int32), bad)
            float(loss)
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times[2:])
    tokens = accum * rows * seq
    tok_s = tokens / step_s
    dev = jax.devices()[0]
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**30
    return {"depth": depth, "dim": mcfg.n_embd, "T": seq, "tokens/step": tokens, "compile_s": compile_s,
            "step_s": step_s, "tok/s": tok_s, "tok/s/chip": tok_s / jax.device_count(),
            "mfu": mfu(tok_s, estimate_flops(mcfg), jax.device_count(), dev.device_kind), "peak_GiB": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="d12 and d20, T=2048, bf16, vocab 32768")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if args.gpu:
        configs = [dict(depth=d, head_dim=128, window="SSSL", seq=2048, batch=b, accum=1, vocab=32768,
                        dtype="bfloat16", remat="dots") for d, b in ((12, 16), (20, 8))]
    else:  # nanochat's runcpu.sh: depth 6, head_dim 64, window L, T=512 (batch trimmed for 2 cores)
        configs = [dict(depth=6, head_dim=64, window="L", seq=512, batch=4, accum=1, vocab=32768,
                        dtype="float32", remat="none")]
    print(f"backend={jax.default_backend()} devices={jax.device_count()} kind={jax.devices()[0].device_kind}")
    print(f"{'depth':>5} {'dim':>5} {'T':>5} {'tok/step':>9} {'compile s':>9} {'step s':>8} {'tok/s':>10} "
          f"{'MFU':>6} {'peak GiB':>8}")
    for cfg in configs:
        r = bench(steps=args.steps, **cfg)
        print(f"{r['depth']:>5} {r['dim']:>5} {r['T']:>5} {r['tokens/step']:>9} {r['compile_s']:>9.1f} "
              f"{r['step_s']:>8.3f} {r['tok/s']:>10,.0f} {100 * r['mfu']:>5.1f}% {r['peak_GiB']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
