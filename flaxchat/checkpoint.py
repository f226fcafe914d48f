"""Training checkpoints that survive crashes: orbax async saves + our own checksums.

Each checkpoint step holds two items: `state` (params, optimizer state, RNG key — any
pytree of jax arrays, restored into whatever sharding the caller's abstract target has,
so a run can resume on a different mesh or device count) and `meta` (JSON: step, data
loader positions, anything small). Orbax writes `state` from every process (each its own
shards of sharded arrays; nothing is gathered) but `meta` from the primary process only,
so whatever differs between processes must be gathered into `meta` before `save()` (the
training loop does that for the loaders' positions, `distributed.allgather_json`).

Orbax restores bytes that were overwritten in place without noticing, so after a save is
finished we write `flaxchat_checksums.json` (sha256 of every file of that step) into the
step directory, and `restore_latest` refuses a step whose files do not match: it warns
and falls back to the previous step. A step finalised by orbax but killed before its
checksums were written is accepted with a warning (orbax's finalisation is atomic).

Checksumming re-reads the whole step, so it never runs on the training thread: `save()`
hands the step to a background thread (on process 0 only) that waits for orbax's async
write to be finalised, hashes it and writes the checksum file. `wait()`/`close()` join it;
`save()` only waits for it when the step it hashes could otherwise be deleted by
retention underneath it (it falls `keep` saves behind). `restore_latest` verifies on
process 0 and every process restores the step process 0 chose.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxchat import storage

log = logging.getLogger(__name__)
CHECKSUMS = "flaxchat_checksums.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def _walk(root: str) -> list[str]:
    """Relative paths of every file under a step directory (local or remote; one listing call)."""
    return storage.find(root)


def _from_process_0(value: int) -> int:
    """Process 0's `value` on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def _on_all(value: int) -> list[int]:
    """`value` of every process, in process order."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int32))).reshape(-1)]


class CheckpointStore:
    """A directory of numbered checkpoints with retention, async saves and verified restore.

    `background_checksums=False` checksums on the calling thread inside `save()`/`wait()`
    (the old behaviour, kept for bench/checkpoint_bench.py's before/after comparison)."""

    def __init__(self, directory: str, keep: int | None = 3, async_save: bool = True,
                 background_checksums: bool = True):
        self.directory = directory if storage.is_gcs(directory) else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._keep = keep
        self._primary = jax.process_index() == 0   # the one process that checksums
        self._background = background_checksums
        self._unsummed: list[int] = []             # synchronous mode: saved, not yet checksummed
        self._pending: collections.deque[tuple[int, Future]] = collections.deque()   # background mode
        self._executor: ThreadPoolExecutor | None = None

    def _step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    # ------------------------------------------------------------------ checksums
    def _checksum_step(self, step: int) -> None:
        """Hash every file of a finalised step and write its checksum file (process 0 only)."""
        root = self._step_dir(step)
        if not storage.exists(root):   # removed by retention, or orbax never finalised it
            return
        try:
            sums = {rel: storage.sha256_file(storage.join(root, rel)) for rel in _walk(root) if rel != CHECKSUMS}
        except FileNotFoundError:
            if not storage.exists(root):
                return
            raise
        storage.write_text(storage.join(root, CHECKSUMS), json.dumps(sums, indent=1, sort_keys=True))

    def _background_job(self, step: int) -> None:
        try:
            # joins orbax's finalize thread: when it returns, `step` (or a later one) is finalised
            self._mgr.wait_until_finished()
        except BaseException as exc:  # the save failed; the training thread gets orbax's own error
            log.warning("checkpoint step %s was not checksummed: its save failed (%s)", step, exc)
            return
        try:
            self._checksum_step(step)
        except Exception as exc:  # noqa: BLE001 — a missing checksum file must not stop training
            # (raising on process 0 alone would leave the others waiting in orbax's next barrier);
            # restore_latest restores such a step with a warning, as after a kill
            warnings.warn(f"could not write the checksums of checkpoint {self._step_dir(step)} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); it will restore unverified", stacklevel=1)

    def _join_pending(self, leave: int = 0) -> None:
        """Wait for background checksum jobs until at most `leave` (the newest) are pending."""
        while len(self._pending) > leave:
            _, future = self._pending.popleft()
            future.result()

    def _write_checksums(self) -> None:
        """Synchronous mode: checksum every saved step (call only when no save is in flight)."""
        existing = set(self._mgr.all_steps())
        for step in self._unsummed:
            if step in existing:  # else removed by retention before we got to it
                self._checksum_step(step)
        self._unsummed = []

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving `state`/`meta` as `step` (returns before the write finishes when async).
        Every process must call it; `meta` is taken from process 0."""
        if not self._background:
            # orbax waits for the previous async save inside save(); checksum it first so a step
            # never stays unverified for longer than one save interval
            self._mgr.wait_until_finished()
            if self._primary:
                self._write_checksums()
        elif self._primary:
            # retention may delete the oldest kept step once this save is finalised: its checksum
            # job must be done by then (only blocks when hashing falls `keep` saves behind)
            self._join_pending(leave=max(self._keep - 1, 0) if self._keep else len(self._pending))
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "step": step})), force=True)
        if not self._primary:
            return
        if not self._background:
            self._unsummed.append(step)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flaxchat-checksums")
        self._pending.append((step, self._executor.submit(self._background_job, step)))

    def wait(self) -> None:
        """Block until every save has landed on storage and been checksummed (on every process:
        with several processes it ends with a barrier, so every process must call it)."""
        self._mgr.wait_until_finished()
        if self._primary:
            if self._background:
                self._join_pending()
            else:
                self._write_checksums()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"flaxchat-checkpoint-wait:{self.directory}")

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    # ------------------------------------------------------------------ restoring
    def verify(self, step: int) -> bool | None:
        """True: every file matches; False: a mismatch or missing file; None: no checksums yet."""
        root = self._step_dir(step)
        sums_path = storage.join(root, CHECKSUMS)
        if not storage.exists(sums_path):
            return None
        sums = json.loads(storage.read_text(sums_path))
        present = set(_walk(root)) - {CHECKSUMS}
        if present != set(sums):
            return False
        return all(storage.sha256_file(storage.join(root, rel)) == digest for rel, digest in sums.items())

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """Newest step that verifies and restores, as (step, state, meta); None if there are none.
        `abstract_state` is a pytree of jax.ShapeDtypeStruct carrying the target shardings.
        Every process must call it: process 0 verifies (one read of the checkpoint, not one per
        host) and all processes restore the same step."""
        self.wait()
        steps = self.steps()
        seen = _on_all(zlib.crc32(json.dumps(steps).encode()) & 0x7FFFFFFF)
        if len(set(seen)) > 1:
            raise CheckpointError(
                f"the processes see different checkpoints in {self.directory} (this one: {steps}); "
                f"checkpoints must live on storage every host shares (e.g. gs://)")
        for step in reversed(steps):
            code = {None: 0, True: 1, False: 2}[self.verify(step)] if self._primary else 0
            ok = {0: None, 1: True, 2: False}[_from_process_0(code)]
            if ok is False:
                warnings.warn(f"checkpoint {self._step_dir(step)} fails its checksums (modified or truncated "
                              f"after it was written); falling back to the previous checkpoint", stacklevel=2)
                continue
            if ok is None:
                warnings.warn(f"checkpoint {self._step_dir(step)} has no checksum file (the run stopped right "
                              f"after saving it); restoring it unverified", stacklevel=2)
            try:
                restored = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                error = None
            except Exception as exc:  # unreadable/corrupt: orbax raises many types
                restored, error = None, f"{type(exc).__name__}: {str(exc)[:200]}"
            if not all(_on_all(int(error is None))):
                why = error or "it could not be read on another process"
                warnings.warn(f"checkpoint {self._step_dir(step)} could not be restored ({why}); "
                              f"falling back to the previous checkpoint", stacklevel=2)
                continue
            return step, restored["state"], dict(restored["meta"])
        return None

    def close(self) -> None:
        self.wait()
        self._mgr.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def tree_digest(tree: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: equal digests mean bitwise-equal trees.
    Sharded leaves are gathered to the host (across processes too) first."""
    import hashlib

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def restore_model_subtree(state_dir: str, target: Any) -> Any:
    """The `model` subtree of a training checkpoint's `state` item, read straight into the shardings
    of `target` (a pytree of jax.ShapeDtypeStruct); the optimizer state beside it is never read,
    so neither its memory nor an optimizer to describe it is needed. Raises CheckpointError."""
    import jax
    item = {"model": target}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
    except Exception as exc:  # orbax raises many types for missing/mismatched checkpoints
        raise CheckpointError(f"cannot restore the model from {state_dir} ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); is the checkpoint complete and was it trained with this config?"
                              ) from exc
    return restored["model"]
