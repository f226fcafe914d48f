"""Training checkpoints that survive crashes: orbax async saves + our own checksums.

Each checkpoint step holds two items: `state` (params, optimizer state, RNG key — any
pytree of jax arrays, restored into whatever sharding the caller's abstract target has,
so a run can resume on a different mesh or device count) and `meta` (JSON: step, data
loader position, anything small).

Orbax restores bytes that were overwritten in place without noticing, so after a save is
finished we write `flaxchat_checksums.json` (sha256 of every file of that step) into the
step directory, and `restore_latest` refuses a step whose files do not match: it warns
and falls back to the previous step. A step finalised by orbax but killed before its
checksums were written is accepted with a warning (orbax's finalisation is atomic).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import orbax.checkpoint as ocp

from flaxchat import storage

log = logging.getLogger(__name__)
CHECKSUMS = "flaxchat_checksums.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def _walk(root: str) -> list[str]:
    """Relative paths of every file under a step directory (local or gs://)."""
    if storage.is_gcs(root):
        out = []
        for name in storage.listdir(root):
            child = storage.join(root, name)
            out += [f"{name}/{p}" for p in _walk(child)] if storage.isdir(child) else [name]
        return sorted(out)
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)


class CheckpointStore:
    """A directory of numbered checkpoints with retention, async saves and verified restore."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = directory if storage.is_gcs(directory) else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._unsummed: list[int] = []

    def _step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def _write_checksums(self) -> None:
        """Checksum every step whose save has completed (call only when no save is in flight)."""
        existing = set(self._mgr.all_steps())
        for step in self._unsummed:
            if step not in existing:  # removed by retention before we got to it
                continue
            root = self._step_dir(step)
            sums = {rel: storage.sha256_file(storage.join(root, rel)) for rel in _walk(root) if rel != CHECKSUMS}
            storage.write_text(storage.join(root, CHECKSUMS), json.dumps(sums, indent=1, sort_keys=True))
        self._unsummed = []

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving `state`/`meta` as `step` (returns before the write finishes when async)."""
        # orbax waits for the previous async save inside save(); checksum it first so a step
        # never stays unverified for longer than one save interval.
        self._mgr.wait_until_finished()
        self._write_checksums()
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "step": step})), force=True)
        self._unsummed.append(step)

    def wait(self) -> None:
        """Block until every save has landed on storage and been checksummed."""
        self._mgr.wait_until_finished()
        self._write_checksums()

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

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
        `abstract_state` is a pytree of jax.ShapeDtypeStruct carrying the target shardings."""
        self.wait()
        for step in reversed(self.steps()):
            ok = self.verify(step)
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
            except Exception as exc:  # unreadable/corrupt: orbax raises many types
                warnings.warn(f"checkpoint {self._step_dir(step)} could not be restored ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); falling back to the previous checkpoint", stacklevel=2)
                continue
            return step, restored["state"], dict(restored["meta"])
        return None

    def close(self) -> None:
        self.wait()
        self._mgr.close()


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
