"""Global batch arrays assembled from what each host loads.

Every host reads only its own rows of the global batch (`host_batch_slice`) and
`make_global_batch` stitches the per-host numpy arrays into one `jax.Array` whose
batch dim is sharded over the ("data", "fsdp") mesh axes, without any host ever
holding the whole batch. `make_mesh` orders devices process-major, so process p's
devices own the p-th contiguous block of rows: the same block `host_batch_slice`
gives it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxchat.mesh import BATCH_MESH_AXES


class BatchShapeError(ValueError):
    """A global batch that can't be split evenly over hosts or devices."""


def host_batch_slice(global_batch: int, process_index: int | None = None,
                     process_count: int | None = None) -> slice:
    """The rows [start, stop) of a `global_batch`-row batch that this host loads."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise BatchShapeError(f"process_index={process_index} is outside [0, {process_count})")
    if global_batch % process_count:
        raise BatchShapeError(
            f"global batch of {global_batch} rows does not split evenly over {process_count} hosts; "
            f"use a multiple of {process_count}")
    rows = global_batch // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


def make_global_batch(local: Any, mesh: Mesh, batch_spec: PartitionSpec | None = None,
                      global_batch: int | None = None) -> Any:
    """Turn this host's rows (an array or a pytree of arrays, leading dim = rows) into
    global `jax.Array`s sharded by `batch_spec` (default: dim 0 over ("data", "fsdp")).

    `global_batch` defaults to local rows x process count, i.e. every host loaded its
    `host_batch_slice`."""
    nproc = jax.process_count()

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            raise BatchShapeError("batch arrays need a leading row dimension; got a scalar")
        rows = global_batch if global_batch is not None else x.shape[0] * nproc
        spec = batch_spec if batch_spec is not None else PartitionSpec(BATCH_MESH_AXES)
        sharding = NamedSharding(mesh, spec)
        split = _dim0_split(mesh, spec)
        if rows % split:
            raise BatchShapeError(
                f"global batch of {rows} rows does not split over the {split} devices of the batch mesh "
                f"axes {spec[0] if len(spec) else ()}; use a multiple of {split}")
        return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

    return jax.tree.map(one, local)


def _dim0_split(mesh: Mesh, spec: PartitionSpec) -> int:
    if not len(spec) or spec[0] is None:
        return 1
    axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
    return int(np.prod([mesh.shape[a] for a in axes]))
