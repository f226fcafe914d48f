"""Training-thread stall per checkpoint save: checksums on the training thread (before) vs on a
background thread (after), at d12 size, in one run.

    uv run python bench/checkpoint_bench.py                 # d12 (286M params + Muon/AdamW state), ~7 min
    uv run python bench/checkpoint_bench.py --quick         # d4, a smoke test (~30 s)

What is saved is exactly what the training loop saves: `checkpoint_state(model, optimizer)` of the
real depth-12 GPT (flaxchat.model.gpt's init, vocab 32768) and its Muon+AdamW optimizer, built sharded
on the local device, with N(0, 0.02) noise added to every float leaf (a fresh optimizer's zero
moments would compress to almost nothing on disk; a trained state's do not; --fresh skips it),
plus a loader-position `meta`, through `CheckpointStore` (orbax async save,
keep=2) into a local temp directory. Between saves the "training" is a sleep of --interval seconds:
on an accelerator the host is mostly idle during steps, so a background thread hashes without
taking CPU from the step (on a CPU-only host it would compete with the step for cores).

Per mode it prints the time spent inside `save()` (the training-thread stall) for every save, the
median over saves 2.. (the first save has no earlier step to checksum in either mode), and the
final `wait()` (the end of a stage, where the last step is hashed in both modes).
  before  `CheckpointStore(background_checksums=False)`: save() waits for the previous async write,
          then re-reads and hashes that whole step on the training thread, then starts the save.
  after   the default: save() starts the orbax save and hands the step to the checksum thread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.checkpoint import CheckpointStore
from flaxchat.config import MeshConfig, ModelConfig, TrainConfig
from flaxchat.mesh import create_sharded, create_sharded_optimizer, make_mesh, mesh_context
from flaxchat.model.gpt import GPT
from flaxchat.optim import build_optimizer
from flaxchat.train.loop import checkpoint_state


def build_state(depth: int, vocab: int, fresh: bool):
    mcfg = ModelConfig(depth=depth, vocab_size=vocab)
    mcfg.derive()
    mesh_cfg = MeshConfig(data=-1, rules="fsdp")
    mesh = make_mesh(mesh_cfg)
    with mesh_context(mesh, mesh_cfg.rules):
        model = create_sharded(lambda: GPT(mcfg, rngs=nnx.Rngs(0)), mesh, mesh_cfg.rules)
        optimizer = create_sharded_optimizer(model, build_optimizer(TrainConfig(), mcfg, num_steps=1000),
                                             mesh, mesh_cfg.rules)
    state = checkpoint_state(model, optimizer)
    if not fresh:   # a fresh optimizer's zero moments (and the zero-init projections) compress to
        # almost nothing on disk; after training they are dense, so add noise to every float leaf
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
        noisy = jax.jit(lambda x, k: x + 0.02 * jax.random.normal(k, x.shape, x.dtype))
        state = jax.tree.map(lambda x: noisy(x, next(keys)) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    jax.block_until_ready(state)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return state, n_params, n_bytes


def run_mode(root: str, background: bool, state, saves: int, interval: float) -> dict:
    directory = os.path.join(root, "after" if background else "before")
    store = CheckpointStore(directory, keep=2, background_checksums=background)
    meta = {"loaders": [{"epoch": 1, "shard_pos": 0, "rg_pos": 3, "buffer": [[0, 1, list(range(50))]]}]}
    stalls = []
    for i in range(1, saves + 1):
        time.sleep(interval)                      # the training steps between two checkpoints
        t0 = time.perf_counter()
        store.save(i, state, meta)
        stalls.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    store.wait()
    final_wait = time.perf_counter() - t0
    assert all(store.verify(s) for s in store.steps()), "a checkpoint failed its checksums"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(directory, str(saves)))
               for f in fs)
    store.close()
    shutil.rmtree(directory)
    return {"stalls": stalls, "final_wait": final_wait, "step_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--saves", type=int, default=4, help="saves per mode")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds of 'training' between saves")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--fresh", action="store_true", help="save the freshly initialised state as is (its zero "
                    "moments compress away on disk) instead of a dense, trained-like one")
    ap.add_argument("--quick", action="store_true", help="depth 4, 3 saves, 2 s apart: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.depth, args.saves, args.interval = 4, 3, 2.0

    t0 = time.perf_counter()
    state, n_params, n_bytes = build_state(args.depth, args.vocab, args.fresh)
    print(f"d{args.depth}: {n_params / 1e6:.1f}M params, checkpoint state {n_bytes / 1e9:.2f} GB "
          f"(params + Muon/AdamW state), built in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}; "
          f"{args.saves} saves {args.interval:g}s apart per mode")
    root = tempfile.mkdtemp(prefix="flaxchat-ckpt-bench-", dir=args.dir)
    try:
        results = {name: run_mode(root, background, state, args.saves, args.interval)
                   for name, background in (("before", False), ("after", True))}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(r: dict) -> float:
        return statistics.median(r["stalls"][1:] or r["stalls"])

    print(f"step directory on disk: {results['after']['step_bytes'] / 1e9:.2f} GB")
    print(f"{'':28s}{'before (sync checksums)':>26s}{'after (background)':>22s}")
    print(f"{'median stall per save, s':28s}{med(results['before']):>26.3f}{med(results['after']):>22.3f}")
    print(f"{'max stall per save, s':28s}{max(results['before']['stalls'][1:] or [0]):>26.3f}"
          f"{max(results['after']['stalls'][1:] or [0]):>22.3f}")
    print(f"{'first save, s':28s}{results['before']['stalls'][0]:>26.3f}{results['after']['stalls'][0]:>22.3f}")
    print(f"{'final wait(), s':28s}{results['before']['final_wait']:>26.3f}{results['after']['final_wait']:>22.3f}")
    print("per save, s:  before " + " ".join(f"{s:.3f}" for s in results["before"]["stalls"])
          + "  |  after " + " ".join(f"{s:.3f}" for s in results["after"]["stalls"]))


if __name__ == "__main__":
    main()
