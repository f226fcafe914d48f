"""CPU benchmark of the GPT: forward+backward tokens/s and compile time, and compile time vs depth.

    uv run python bench/model_bench.py            # ~2-4 minutes on 2 cores

Table 1: depth 4 and 6 (head_dim 64, vocab 8192, T=512, batch 4, fp32), remat none/full: compile
seconds of jit(value_and_grad(loss)) and steady-state training tokens/s (optimizer excluded).
Table 2: compile seconds only (abstract params, nothing allocated) at depth 4 vs 24 with the width
held fixed, plus nanochat's real d24 shape: the layers run under one lax.scan, so compile time
should not grow with depth.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.model.gpt import GPT, gpt_forward

VOCAB, SEQ, BATCH = 8192, 512, 4


def loss_grad(spec):
    return jax.jit(jax.value_and_grad(lambda p, x, y: gpt_forward(p, spec, x, y)))


def train_speed(depth: int, remat: str, steps: int = 3) -> tuple[float, float]:
    cfg = ModelConfig(depth=depth, head_dim=64, vocab_size=VOCAB, sequence_len=SEQ, compute_dtype="float32",
                      remat=remat)
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(0))
    params = model.param_tree()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    t0 = time.perf_counter()
    step = loss_grad(model.spec).lower(params, x, x).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(step(params, x, x))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step(params, x, x)
    jax.block_until_ready(out)
    return compile_s, BATCH * SEQ * steps / (time.perf_counter() - t0)


def compile_seconds(depth: int, aspect: int, head_dim: int, vocab: int, seq: int, batch: int) -> tuple[int, float]:
    cfg = ModelConfig(depth=depth, aspect_ratio=aspect, head_dim=head_dim, vocab_size=vocab, sequence_len=seq,
                      compute_dtype="float32")
    cfg.derive()
    abstract = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    params = abstract.param_tree()
    x = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    loss_grad(abstract.spec).lower(params, x, x).compile()
    return cfg.n_embd, time.perf_counter() - t0


def main() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    print(f"\nforward+backward, vocab {VOCAB}, T={SEQ}, batch {BATCH}, fp32")
    print(f"{'depth':>5} {'remat':>6} {'compile_s':>10} {'tokens/s':>10}")
    for depth in (4, 6):
        for remat in ("none", "full"):
            c, tps = train_speed(depth, remat)
            print(f"{depth:>5} {remat:>6} {c:>10.2f} {tps:>10.0f}", flush=True)
    print("\ncompile only (abstract params), batch 1")
    print(f"{'depth':>5} {'n_embd':>6} {'vocab':>6} {'T':>5} {'compile_s':>10}")
    for depth, aspect, hd, vocab, seq in ((4, 96, 64, 8192, 512), (24, 16, 64, 8192, 512),
                                          (4, 64, 128, 32768, 2048), (24, 64, 128, 32768, 2048)):
        width, c = compile_seconds(depth, aspect, hd, vocab, seq, 1)
        print(f"{depth:>5} {width:>6} {vocab:>6} {seq:>5} {c:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
