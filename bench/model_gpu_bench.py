"""GPU benchmark of the GPT forward+backward: tokens/s, MFU per chip, compile time, peak memory.

Run on a machine with a GPU (the lead runs it when one is lent):
    uv run python bench/model_gpu_bench.py                      # d12 and d20, T=2048, bf16
    uv run python bench/model_gpu_bench.py --depths 12 --impls cudnn xla --remats none dots
    XLA_FLAGS=--xla_gpu_enable_command_buffer= uv run python bench/model_gpu_bench.py --depths 12 --profile

Measured on one H100 80GB (jax 0.11.2, cudnn attention, T=2048, vocab 32768; no optimizer step):
    d12 B=16 remat none 96 ms/step 26% MFU | remat dots 82 ms 30% | B=32 dots 32% MFU
    d20 B=16 remat none: out of memory      | remat dots 247 ms 39% MFU (133k tok/s)
    d24 B=8 remat dots 191 ms 41% MFU (86k tok/s)

Each configuration builds the model at vocab 32768, jits value_and_grad of the mean loss over
random tokens (the optimizer update is not included: this measures the model), warms up, then
times `--steps` steps. MFU uses nanochat's FLOPs/token (flaxchat.model.flops.estimate_flops) against the
dense bf16 peak of `device_kind`. A check line compares the loss of each attention implementation
against xla on the same batch, so a kernel that silently ignores the window would show up.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.model.flops import estimate_flops, mfu, param_counts
from flaxchat.model.gpt import GPT, gpt_forward


def peak_memory_gb(device) -> float:
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def print_profile(compiled, args, steps: int = 3, top: int = 25) -> None:
    """Trace a few steps and print the device kernels that take the most time. Run with
    XLA_FLAGS=--xla_gpu_enable_command_buffer= so kernels are not hidden inside CUDA graphs."""
    from jax.profiler import ProfileData
    out_dir = tempfile.mkdtemp(prefix="flaxchat-prof-")
    with jax.profiler.trace(out_dir):
        for _ in range(steps):
            out = compiled(*args)
        jax.block_until_ready(out)
    data = ProfileData.from_file(glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True)[0])
    by_op: dict[str, float] = collections.defaultdict(float)
    by_line: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name in ("XLA Modules", "Steps", "XLA TraceMe", "Framework Ops", "Framework Name Scope", "Source code"):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                by_op[f"{ev.name[:70]} [{stats.get('hlo_op', '')}]"] += ev.duration_ns / steps
                by_line[line.name] += ev.duration_ns / steps
    print("profile lines (ms/step):", {k: round(v / 1e6, 2) for k, v in by_line.items()})
    total = sum(by_op.values())
    for name, ns in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ns / 1e6:8.2f} ms  {100 * ns / total:5.1f}%  {name}")


def bench_one(depth: int, batch: int, seq: int, impl: str, remat: str, steps: int, dtype: str,
              profile: bool = False) -> dict:
    cfg = ModelConfig(depth=depth, sequence_len=seq, vocab_size=32768, compute_dtype=dtype,
                      attention_impl=impl, remat=remat)
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(0))
    spec, params = model.spec, model.param_tree()
    rng = np.random.default_rng(0)
    idx = jnp.asarray(rng.integers(0, 32768, size=(batch, seq)), jnp.int32)
    tgt = jnp.asarray(rng.integers(0, 32768, size=(batch, seq)), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda p, x, y: gpt_forward(p, spec, x, y)))
    t0 = time.perf_counter()
    compiled = step.lower(params, idx, tgt).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        loss, grads = compiled(params, idx, tgt)
    jax.block_until_ready(grads)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, grads = compiled(params, idx, tgt)
    jax.block_until_ready((loss, grads))
    dt = (time.perf_counter() - t0) / steps
    if profile:
        print_profile(compiled, (params, idx, tgt))
    tok_s = batch * seq / dt
    dev = jax.devices()[0]
    fpt = estimate_flops(spec)
    return dict(depth=depth, impl=spec.attention_impl, remat=remat, batch=batch, loss=float(loss),
                step_ms=dt * 1e3, tok_s=tok_s, mfu=mfu(tok_s, fpt, 1, dev.device_kind),
                tflops=tok_s * fpt / 1e12, compile_s=compile_s, peak_gb=peak_memory_gb(dev),
                params_m=param_counts(spec)["total"] / 1e6)


def check_impls(depth: int, seq: int, impls: list[str]) -> None:
    """Loss of each implementation vs xla on one batch, random non-zero weights, short windows live."""
    cfg = ModelConfig(depth=depth, sequence_len=seq, vocab_size=32768, compute_dtype="bfloat16")
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(model.param_tree())
    rng = np.random.default_rng(1)
    params = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim >= 2 else 1),
                                                      jnp.float32) for x in leaves])
    idx = jnp.asarray(rng.integers(0, 32768, size=(2, seq)), jnp.int32)
    losses = {}
    for impl in ["xla"] + [i for i in impls if i != "xla"]:
        spec = dataclasses.replace(model.spec, attention_impl=impl)
        losses[impl] = float(jax.jit(gpt_forward, static_argnums=1)(params, spec, idx, idx))
        full = dataclasses.replace(spec, windows=(seq,) * depth)
        losses[impl + "_nowindow"] = float(jax.jit(gpt_forward, static_argnums=1)(params, full, idx, idx))
    print("check (bf16, random weights, windows", model.spec.windows[:4], "...):",
          ", ".join(f"{k}={v:.5f}" for k, v in losses.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[12, 20])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--impls", nargs="+", default=["cudnn"])
    ap.add_argument("--remats", nargs="+", default=["none"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top device ops of the first configuration")
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.device_kind} ({jax.default_backend()}), T={args.seq}, B={args.batch}, {args.dtype}")
    if not args.no_check:
        check_impls(min(args.depths), args.seq, args.impls)
    cols = ["depth", "impl", "remat", "batch", "params_m", "step_ms", "tok_s", "tflops", "mfu", "compile_s", "peak_gb", "loss"]
    print("peak_gb is the process-wide peak so far (JAX cannot reset it): run one config per process for exact values")
    print(" | ".join(f"{c:>9}" for c in cols))
    for depth in args.depths:
        for impl in args.impls:
            for remat in args.remats:
                try:
                    r = bench_one(depth, args.batch, args.seq, impl, remat, args.steps, args.dtype, args.profile)
                    args.profile = False
                except Exception as e:  # keep going: one OOM or unsupported kernel shouldn't hide the rest
                    print(f"d{depth} {impl} {remat}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                print(" | ".join(f"{r[c]:>9.3f}" if isinstance(r[c], float) else f"{r[c]:>9}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
