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
    """Turn this host's rows (an array or a pytree of arrays) into global `jax.Array`s
    sharded by `batch_spec` (default: dim 0 over ("data", "fsdp")). The row dim is the
    first dim the spec shards, e.g. dim 1 for P(None, ("data", "fsdp")) on stacked
    (accum, rows, T) micro-batches.

    `global_batch` (rows in the whole job) defaults to local rows x process count, i.e.
    every host loaded its `host_batch_slice`."""
    spec = batch_spec if batch_spec is not None else PartitionSpec(BATCH_MESH_AXES)
    row_dim = next((d for d, entry in enumerate(spec) if entry is not None), 0)
    split = _dim_split(mesh, spec, row_dim)
    sharding = NamedSharding(mesh, spec)
    nproc = jax.process_count()

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim <= row_dim:
            raise BatchShapeError(f"batch array of shape {x.shape} has no row dim {row_dim} for spec {spec}")
        rows = global_batch if global_batch is not None else x.shape[row_dim] * nproc
        if rows % split:
            raise BatchShapeError(
                f"global batch of {rows} rows does not split over the {split} devices of mesh axes "
                f"{spec[row_dim]}; use a multiple of {split}")
        shape = (*x.shape[:row_dim], rows, *x.shape[row_dim + 1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local)


def _dim_split(mesh: Mesh, spec: PartitionSpec, dim: int) -> int:
    """How many ways `spec` splits dim `dim` on `mesh`."""
    if dim >= len(spec) or spec[dim] is None:
        return 1
    axes = (spec[dim],) if isinstance(spec[dim], str) else spec[dim]
    return int(np.prod([mesh.shape[a] for a in axes]))
