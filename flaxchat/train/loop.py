"""The one training loop: pretrain, SFT and GRPO differ only in their loss and their batches.

Per optimizer step: `accum_steps` micro-batches are stacked into one (accum, B, T) global
array and a single jitted, donated step scans over them (gradient accumulation inside the
compiled program), then applies the optimizer. The host syncs with the device only at log,
eval and checkpoint intervals: the loss of each step stays on the device, and the first
non-finite step is tracked on the device so a NaN is still reported with its step number.

State that makes a run exactly resumable lives in the checkpoint: model params, optimizer
state (incl. its step counter, which drives every schedule) and the data loader's position,
one per process (each host reads its own share of the data), gathered into the checkpoint's
`meta` as `loaders[process_index]`; on resume every process continues from its own.
Batch k is therefore a pure function of (seed, k, data) whether or not the run was killed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import PartitionSpec

from flaxchat.batches import make_global_batch
from flaxchat.checkpoint import CheckpointStore
from flaxchat.distributed import allgather_json
from flaxchat.model.flops import mfu

LossFn = Callable[[nnx.Module, dict[str, jax.Array]], jax.Array]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class BatchSource(Protocol):
    """An iterator of host-local micro-batches (dicts of (B_local, T) arrays) with a resumable
    position: `state_dict()` is the position after the last batch handed out."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def state_dict(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class LoopConfig:
    num_steps: int
    accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 0            # 0 = only at the end
    sample_every: int = 0          # 0 = only at the end
    checkpoint_every: int = 0      # 0 = only at the end
    tokens_per_step: int = 0       # for throughput; 0 = count from the batches
    flops_per_token: float = 0.0   # for MFU
    lr_at: Callable[[int], float] | None = None   # the schedule's LR multiplier, for logging


@dataclasses.dataclass
class LoopResult:
    step: int
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    resumed_from: int | None
    checkpoint_step: int | None


def _pure(tree: Any) -> Any:
    return nnx.to_pure_dict(tree)


def checkpoint_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
    return {"model": _pure(nnx.state(model)), "optimizer": _pure(nnx.state(optimizer))}


def restore_into(model: nnx.Module, optimizer: nnx.Optimizer, restored: dict[str, Any]) -> None:
    for obj, key in ((model, "model"), (optimizer, "optimizer")):
        state = nnx.state(obj)
        nnx.replace_by_pure_dict(state, restored[key])
        nnx.update(obj, state)


def own_loader_state(meta: dict[str, Any]) -> dict[str, Any] | None:
    """This process's data position from a checkpoint's `meta`: `loaders[process_index]`.
    With fewer saved positions than processes (the job grew) process p gets position 0: a
    source whose position does not depend on the process (GRPO's round) continues, a
    PackedLoader refuses it with its "saved with different settings" error. Checkpoints from
    before per-process positions carry one `loader`."""
    if "loaders" not in meta:
        return meta.get("loader")
    loaders, p = meta["loaders"], jax.process_index()
    return loaders[p] if p < len(loaders) else loaders[0]


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def make_train_step(model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: LossFn):
    """(state, batch, step, first_bad) -> (state, loss, first_bad); state is donated."""
    graphdef, _ = nnx.split((model, optimizer))

    def step_fn(state, batch, step, first_bad):
        model, optimizer = nnx.merge(graphdef, state)
        # plain jax.grad over the Param state: nnx transforms can't take a module from an outer trace
        gdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_of(p, mb):
            return loss_fn(nnx.merge(gdef, p, rest), mb)

        def micro(acc, mb):
            loss, grads = jax.value_and_grad(loss_of)(params, mb)
            return jax.tree.map(jnp.add, acc, grads), loss

        grads, losses = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), batch)
        n = losses.shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        loss = losses.mean()
        optimizer.update(model, grads)
        first_bad = jnp.where((first_bad < 0) & ~jnp.isfinite(loss), step, first_bad)
        return nnx.state((model, optimizer)), loss, first_bad

    return jax.jit(step_fn, donate_argnums=(0,))


def _stack(micro_batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([mb[k] for mb in micro_batches]) for k in micro_batches[0]}


def train(*, model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: LossFn, mesh: jax.sharding.Mesh,
          make_batches: Callable[[dict[str, Any] | None], BatchSource], cfg: LoopConfig,
          store: CheckpointStore | None = None, resume_stores: tuple[CheckpointStore, ...] = (),
          evaluate: Callable[[nnx.Module], dict[str, float]] | None = None,
          sample: Callable[[nnx.Module, int], list[dict[str, str]]] | None = None,
          sinks: tuple[Callable[[str, dict[str, Any]], None], ...] = ()) -> LoopResult:
    """Run (or continue) training to `cfg.num_steps` optimizer steps.

    Resumes from the newest good checkpoint in `store`, else in `resume_stores` (e.g. the origin
    run's checkpoints after a Metaflow `resume`). `sinks` receive ("train"|"eval"|"sample"|"info",
    record) events: console, JSONL, wandb, live cards."""
    def emit(kind: str, record: dict[str, Any]) -> None:
        for sink in sinks:
            sink(kind, record)

    emit("info", {"message": f"training to step {cfg.num_steps} ({cfg.accum_steps} micro-batches per step)",
                  "num_steps": cfg.num_steps})
    start_step, loader_state, resumed_from = 0, None, None
    target = _abstract(checkpoint_state(model, optimizer))
    for candidate in ((store,) if store else ()) + tuple(resume_stores):
        found = candidate.restore_latest(target)
        if found:
            start_step, restored, meta = found
            restore_into(model, optimizer, restored)
            loader_state, resumed_from = own_loader_state(meta), start_step
            emit("info", {"message": f"resumed from step {start_step} of {candidate.directory}"})
            break

    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    last_saved: int | None = resumed_from

    def run_eval(step: int, do_eval: bool, do_sample: bool) -> None:
        if evaluate is not None and do_eval:
            record = {"step": step, **evaluate(model)}
            evals.append(record)
            emit("eval", record)
        if sample is not None and do_sample:
            record = {"step": step, "samples": sample(model, step)}
            samples.append(record)
            emit("sample", record)

    def save(step: int, loader: BatchSource) -> None:
        nonlocal last_saved
        if store is not None:
            # every process's position (orbax writes `meta` from process 0 only); tiny JSON, no arrays
            store.save(step, checkpoint_state(model, optimizer), {"loaders": allgather_json(loader.state_dict())})
            last_saved = step

    batches = make_batches(loader_state)
    try:
        iterator = iter(batches)
        train_step = make_train_step(model, optimizer, loss_fn)
        graph_state = nnx.state((model, optimizer))
        first_bad = jnp.asarray(-1, jnp.int32)
        step = start_step
        if step == 0:
            run_eval(0, True, True)  # the baseline every later eval improves on
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0

        def check_finite(at_step: int) -> None:
            bad = int(first_bad)
            if bad >= 0:
                where = f"step {last_saved} in {store.directory}" if (store and last_saved is not None) else "none"
                raise TrainingDiverged(
                    f"loss became NaN/inf at step {bad + 1}; last good checkpoint: {where}. "
                    f"Lower the learning rates or check the data, then resume")

        while step < cfg.num_steps:
            batch = _global(_stack([next(iterator) for _ in range(cfg.accum_steps)]), mesh)
            graph_state, loss, first_bad = train_step(graph_state, batch, jnp.asarray(step, jnp.int32), first_bad)
            step += 1
            window_steps += 1
            window_tokens += cfg.tokens_per_step or int(np.prod(batch["inputs"].shape))
            is_last = step == cfg.num_steps
            if step % cfg.log_every == 0 or is_last:
                loss_value = float(loss)  # the one host sync per logging interval
                check_finite(step)
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / max(elapsed, 1e-9)
                record = {"step": step, "loss": loss_value, "tok_per_s": tok_s, "step_s": elapsed / window_steps,
                          "lr_mult": cfg.lr_at(step - 1) if cfg.lr_at else math.nan}
                if cfg.flops_per_token:
                    record["mfu"] = mfu(tok_s, cfg.flops_per_token, jax.device_count(), jax.devices()[0].device_kind)
                history.append(record)
                emit("train", record)
                window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
            # the model objects see the new state (a reference swap, no copy) before anyone reads them
            nnx.update((model, optimizer), graph_state)
            do_eval = bool(cfg.eval_every and step % cfg.eval_every == 0)
            do_sample = bool(cfg.sample_every and step % cfg.sample_every == 0)
            if (do_eval or do_sample) and not is_last:
                check_finite(step)
                run_eval(step, do_eval, do_sample)
                window_start = time.perf_counter()  # throughput counts training time only
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) and not is_last:
                check_finite(step)
                save(step, batches)

        if start_step < cfg.num_steps or last_saved != cfg.num_steps:
            check_finite(step)
            run_eval(step, True, True)
            save(step, batches)
        if store is not None:
            store.wait()  # the final checkpoint must be on storage before the stage returns
    finally:
        getattr(batches, "close", lambda: None)()  # stop a prefetch thread
    return LoopResult(step=step, history=history, evals=evals, samples=samples,
                      resumed_from=resumed_from, checkpoint_step=last_saved)


def _global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """(accum, B_local, T) host arrays -> global arrays with the batch rows sharded over data×fsdp."""
    return make_global_batch(batch, mesh, PartitionSpec(None, ("data", "fsdp")))
