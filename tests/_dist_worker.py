"""Helper process for tests/test_distributed.py (and shared tiny-model helpers for test_mesh.py).

Run as a script it does one data-parallel SGD step of the tiny GPT on its share of a
fixed global batch and prints one JSON line: the loss and a sha256 of every param leaf
after the step. Modes:
  --num-processes N --process-id i --coordinator host:port   one process of an N-process job
  (none of those)                                             single process, all local devices
Each process loads only its `host_batch_slice` of the batch.

  --train DATA_DIR --ckpt DIR --steps N ...                   the real training loop (Muon+AdamW,
      PackedLoader over DATA_DIR's parquet shards, checkpoints in DIR), see `train_run`; prints
      the loader position it resumed from and a digest of the final params and optimizer state
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

GLOBAL_BATCH = 4
SEED = 0
LEARNING_RATE = 0.5


def tiny_model_config():
    from flaxchat.config import ModelConfig
    cfg = ModelConfig(depth=2, head_dim=32, aspect_ratio=32, vocab_size=256, sequence_len=64,
                      compute_dtype="float32")
    cfg.derive()
    return cfg


def tiny_model_factory(seed: int = SEED):
    from flax import nnx

    from flaxchat.model.gpt import GPT
    cfg = tiny_model_config()
    return lambda: GPT(cfg, nnx.Rngs(seed))


def fixed_batch(global_batch: int = GLOBAL_BATCH, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (idx, targets) int32 of shape (global_batch, sequence_len)."""
    cfg = tiny_model_config()
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (global_batch, cfg.sequence_len + 1))
    tokens = tokens.astype(np.int32)
    targets = tokens[:, 1:].copy()
    targets[0, :5] = -1   # some ignored positions, as real packed batches have
    return tokens[:, :-1], targets


def loss_and_grad_fn(model):
    """(jitted fn(params, idx, targets) -> (loss, grads), graphdef, params, rest) for an NNX model."""
    import jax
    from flax import nnx
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(p, idx, targets):
        return nnx.merge(graphdef, p, rest)(idx, targets)

    return jax.jit(jax.value_and_grad(loss_of)), graphdef, params, rest


def perturbed(params, scale: float = 0.05, seed: int = 7):
    """params + fixed noise, keeping each leaf's sharding. At init both output projections
    are zero, which zeroes most gradients; the noise makes every gradient non-trivial."""
    import jax
    rng = np.random.default_rng(seed)

    def one(x):
        host = np.asarray(x) if x.is_fully_addressable else np.asarray(x.addressable_data(0))
        assert host.shape == x.shape, "perturbed() needs fully addressable or replicated leaves"
        new = (host + scale * rng.standard_normal(host.shape)).astype(host.dtype)
        return jax.make_array_from_callback(x.shape, x.sharding, lambda index: new[index])

    return jax.tree.map(one, params)


def leaf_names(tree) -> list[str]:
    import jax
    return [".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                     if getattr(k, "name", None) != "value")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaf_hashes(tree) -> dict[str, str]:
    """sha256 of every array leaf's bytes (this process's copy), keyed by its path."""
    import jax
    out = {}
    for name, leaf in zip(leaf_names(tree), jax.tree.leaves(tree)):
        data = np.asarray(leaf.addressable_data(0)) if hasattr(leaf, "addressable_data") else np.asarray(leaf)
        if hasattr(leaf, "addressable_data") and data.shape != leaf.shape:
            raise AssertionError(f"{name} is not replicated; cannot hash it locally")
        out[name] = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
    return out


def sgd_step_hashes(npz_path: str | None = None, devices=None) -> dict:
    """One pure-DP SGD step of the (perturbed) tiny GPT on this process's rows, on a mesh over
    `devices` (default all); param hashes before and after it. `npz_path`: also save the
    updated params there."""
    import jax

    from flaxchat.batches import host_batch_slice, make_global_batch
    from flaxchat.config import MeshConfig
    from flaxchat.mesh import create_sharded, make_mesh

    mesh = make_mesh(MeshConfig(data=-1, rules="replicated"), devices=devices)
    model = create_sharded(tiny_model_factory(), mesh, "replicated")
    grad_fn, _, params, _ = loss_and_grad_fn(model)
    idx, targets = fixed_batch()
    rows = host_batch_slice(GLOBAL_BATCH, jax.process_index(), jax.process_count())
    batch = make_global_batch({"idx": idx[rows], "targets": targets[rows]}, mesh)

    @jax.jit
    def step(p, idx, targets):
        loss, grads = grad_fn(p, idx, targets)
        return loss, jax.tree.map(lambda w, g: w - LEARNING_RATE * g, p, grads)

    params = perturbed(params)
    loss, new_params = step(params, batch["idx"], batch["targets"])
    if npz_path:
        np.savez(npz_path, **{name: np.asarray(leaf.addressable_data(0))
                              for name, leaf in zip(leaf_names(new_params), jax.tree.leaves(new_params))})
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": mesh.size, "rows": [rows.start, rows.stop],
            "loss": float(np.asarray(loss.addressable_data(0))),
            "hashes_before": leaf_hashes(params), "hashes": leaf_hashes(new_params)}


# --------------------------------------------------------------------------- the real training loop

TRAIN_ROWS = 4          # global rows per step (2 per process in the 2-process job)
TRAIN_BUFFER_DOCS = 4   # small, so the loaders' positions move every few steps


def byte_encode(texts: list[str]) -> list[list[int]]:
    """Bytes as token ids; BOS is 0, which no UTF-8 text byte is."""
    return [list(t.encode("utf-8")) for t in texts]


class DictBatches:
    """(inputs, targets) -> {"inputs", "targets"}; `parts` loaders' rows are stacked in order, so one
    process can yield exactly the global batch that `len(parts)` processes load together."""

    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        for pieces in zip(*self.parts):
            yield {"inputs": np.concatenate([p[0] for p in pieces]),
                   "targets": np.concatenate([p[1] for p in pieces])}

    def state_dict(self):
        states = [p.state_dict() for p in self.parts]
        return states[0] if len(states) == 1 else {"parts": states}

    def close(self):
        for p in self.parts:
            p.close()


def train_run(data_dir: str, ckpt: str, steps: int, every: int, kill_at: int | None = None,
              emulate: int = 0, npz: str | None = None) -> dict:
    """Train the tiny GPT with flaxchat.train.loop.train (checkpoints every `every` steps in `ckpt`,
    resuming from it) on an FSDP mesh over all devices of all processes. `kill_at`: SIGKILL every
    process once the checkpoint of that step has landed. `emulate=P` (one process): load the
    global batch of a P-process job with P loaders, one per virtual process."""
    import glob
    import signal

    import jax
    from flax import nnx

    from flaxchat.checkpoint import CheckpointStore, tree_digest
    from flaxchat.config import MeshConfig, TrainConfig
    from flaxchat.data.loader import PackedLoader, Prefetcher
    from flaxchat.mesh import create_sharded, create_sharded_optimizer, make_mesh, mesh_context
    from flaxchat.optim import build_optimizer
    from flaxchat.train.loop import LoopConfig, train

    cfg = tiny_model_config()
    mesh_cfg = MeshConfig(data=1, fsdp=-1, rules="fsdp")
    mesh = make_mesh(mesh_cfg)
    shards = sorted(glob.glob(os.path.join(data_dir, "*.parquet")))
    layout = [(i, emulate) for i in range(emulate)] if emulate else [(jax.process_index(), jax.process_count())]
    given: dict = {}

    def make_batches(state):
        given["state"] = state
        states = state["parts"] if emulate and state else [state] * len(layout)
        return DictBatches([Prefetcher(PackedLoader(
            shards, byte_encode, 0, TRAIN_ROWS, cfg.sequence_len, buffer_docs=TRAIN_BUFFER_DOCS,
            process_index=p, process_count=n, seed=SEED, state=s)) for (p, n), s in zip(layout, states)])

    store = CheckpointStore(ckpt, keep=2)
    if kill_at is not None:
        real_save = store.save

        def save(step, state, meta):
            real_save(step, state, meta)
            if step == kill_at:
                store.wait()   # landed and checksummed (ends with a barrier: every process is here)
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        store.save = save
    with mesh_context(mesh, mesh_cfg.rules):
        model = create_sharded(tiny_model_factory(), mesh, mesh_cfg.rules)
        tx = build_optimizer(TrainConfig(warmup_steps=1, batch_lr_scaling=False), cfg, num_steps=steps)
        optimizer = create_sharded_optimizer(model, tx, mesh, mesh_cfg.rules)
        result = train(model=model, optimizer=optimizer, mesh=mesh, make_batches=make_batches,
                       loss_fn=lambda m, b: m(b["inputs"], b["targets"]),
                       cfg=LoopConfig(num_steps=steps, log_every=1, checkpoint_every=every), store=store)
    store.close()
    final = {"model": nnx.to_pure_dict(nnx.state(model)), "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if npz and jax.process_index() == 0:
        from jax.experimental import multihost_utils
        np.savez(npz, **{name: np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
                         for name, leaf in zip(leaf_names(params), jax.tree.leaves(params))})
    elif npz:   # process_allgather is a collective: the other processes take part
        from jax.experimental import multihost_utils
        for leaf in jax.tree.leaves(params):
            multihost_utils.process_allgather(leaf, tiled=True)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "resumed_from": result.resumed_from,
            "resumed_loader_state": given["state"], "losses": [r["loss"] for r in result.history],
            "steps": result.step, "digest": tree_digest(final), "params_digest": tree_digest(params),
            "wte_local_shape": list(params["wte"].addressable_shards[0].data.shape)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--init-only", action="store_true", help="only join the job (for the error tests)")
    parser.add_argument("--npz", help="save the params after the step to this .npz")
    parser.add_argument("--one-device-npz", help="single process only: also run the step on one device, "
                                                 "saving its params here")
    parser.add_argument("--train", metavar="DATA_DIR", help="run the training loop on these parquet shards")
    parser.add_argument("--ckpt", help="--train: checkpoint directory")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=3, help="--train: checkpoint interval")
    parser.add_argument("--kill-at", type=int, help="--train: SIGKILL once this step's checkpoint landed")
    parser.add_argument("--emulate", type=int, default=0, help="--train, one process: load the global batch "
                                                                "of this many processes")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    from flaxchat.distributed import DistributedInitError, initialize_distributed
    try:
        spec = initialize_distributed(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
    except DistributedInitError as err:
        print(json.dumps({"error": "DistributedInitError", "message": str(err)}), flush=True)
        sys.exit(3)
    again = initialize_distributed(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
    assert again is spec, "initialize_distributed must be idempotent"
    if args.init_only:
        print(json.dumps({"joined": spec.source}), flush=True)
        return
    if args.train:
        print(json.dumps(train_run(args.train, args.ckpt, args.steps, args.every, args.kill_at, args.emulate,
                                   args.npz)), flush=True)
        return
    report = sgd_step_hashes(args.npz)
    if args.one_device_npz:
        import jax
        report["one_device"] = sgd_step_hashes(args.one_device_npz, devices=jax.devices()[:1])
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
