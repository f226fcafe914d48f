"""The device mesh and the logical-axis rules every stage shards its state with.

Params carry *logical* axis names in their Variable metadata (`out_sharding`, e.g.
("embed", "mlp")); a rule preset maps those names onto the three mesh axes
("data", "fsdp", "tensor"), MaxText style. Keeping the names logical lets one model
definition run pure data-parallel, FSDP or FSDP+tensor-parallel by changing one
config string (`mesh.rules`).

State is created already sharded: the factory is traced abstractly (no memory) to
learn every leaf's shape and sharding, then run under `jax.jit(out_shardings=...)`,
so each device only ever materialises its own shard. Random init is identical under
any sharding because JAX's threefry RNG is partitionable (the default).

The mesh uses Auto axes (GSPMD propagation): the model code stays sharding-agnostic
apart from optional `with_logical_constraint` hints on activations.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxchat.config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_MESH_AXES: tuple[str, str] = ("data", "fsdp")   # activations' batch dim is split over both

MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]
M = TypeVar("M")


class MeshShapeError(ValueError):
    """The configured mesh sizes don't fit the devices that exist."""


class ShardingRuleError(ValueError):
    """A bad rule preset or rule table."""


# --------------------------------------------------------------------------- mesh

def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`; one size may be -1 = "the rest"."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    desc = f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}"
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshShapeError(f"{desc}: sizes must be positive or -1 ('the rest of the devices')")
    if sizes.count(-1) > 1:
        raise MeshShapeError(f"{desc}: only one mesh axis may be -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise MeshShapeError(
                f"{desc} cannot use {num_devices} devices: the fixed sizes multiply to {fixed}, "
                f"which does not divide {num_devices}; pick sizes whose product divides the device count")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshShapeError(
            f"{desc} needs {fixed} devices but {num_devices} exist; make the product equal the device "
            f"count or set one axis to -1")
    return sizes[0], sizes[1], sizes[2]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over all devices of all hosts (or `devices`).

    "tensor" is the innermost axis so tensor-parallel collectives stay on the fastest
    links; on multi-slice TPU the "data" axis is the one that crosses slices (DCN)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 3
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        from jax.experimental import mesh_utils
        if shape[0] % num_slices:
            raise MeshShapeError(
                f"mesh data={shape[0]} must be a multiple of the {num_slices} TPU slices (data crosses slices)")
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // num_slices, shape[1], shape[2]), (num_slices, 1, 1), devices)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


# --------------------------------------------------------------------------- rules
# Rules are listed in priority order: when two dims of one array want the same mesh axis
# the earlier rule wins and the later dim falls through to its next rule (or stays
# replicated). A logical name may appear more than once to give fallbacks.

_ACTIVATION_RULES: LogicalRules = (("batch", BATCH_MESH_AXES), ("seq", None))

RULE_PRESETS: dict[str, LogicalRules] = {
    # pure data parallel: every param whole on every device
    "replicated": _ACTIVATION_RULES + (
        ("vocab", None), ("embed", None), ("heads", None), ("kv", None), ("mlp", None), ("layers", None)),
    # ZeRO-3 style: every block matrix and the embeddings have an "embed" dim; tables without
    # one (value embeddings: vocab x kv) fall back to sharding their vocab rows
    "fsdp": _ACTIVATION_RULES + (
        ("embed", "fsdp"), ("vocab", "fsdp"), ("mlp", "fsdp"),
        ("heads", None), ("kv", None), ("layers", None)),
    # Megatron-style tensor parallel on top of FSDP
    "fsdp_tp": _ACTIVATION_RULES + (
        ("embed", "fsdp"), ("heads", "tensor"), ("kv", "tensor"), ("mlp", "tensor"),
        ("vocab", "tensor"), ("vocab", "fsdp"), ("layers", None)),
}


def get_rules(rules: str | Sequence[tuple[str, MeshAxes]]) -> LogicalRules:
    """A preset name or an explicit rule table -> a validated rule tuple."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ShardingRuleError(f"unknown sharding rules {rules!r}; choose one of {list(RULE_PRESETS)}")
        return RULE_PRESETS[rules]
    table = tuple((str(name), axes if axes is None or isinstance(axes, str) else tuple(axes))
                  for name, axes in rules)
    for name, axes in table:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            if axis not in MESH_AXES:
                raise ShardingRuleError(f"rule {name!r} -> {axis!r}: mesh axes are {MESH_AXES}")
    return table


def _mesh_sizes(mesh: Mesh | jax.sharding.AbstractMesh | None) -> dict[str, int] | None:
    return None if mesh is None else dict(mesh.shape)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: str | Sequence[tuple[str, MeshAxes]],
                    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Map one array's logical axis names to a PartitionSpec.

    With `mesh`, size-1 mesh axes are skipped (they shard nothing and would block a
    fallback); with `shape` too, a dim is only sharded over axes whose product divides
    it (jit rejects uneven shardings), else that dim stays replicated. Names without a
    rule are replicated; a name that *is* a mesh axis passes through unchanged."""
    if not logical_axes:
        return PartitionSpec()
    table = get_rules(rules)
    sizes = _mesh_sizes(mesh)
    names = list(logical_axes)
    assigned: list[tuple[str, ...] | None] = [None] * len(names)
    used: set[str] = set()

    def claim(dim: int, axes: MeshAxes) -> None:
        wanted = (axes,) if isinstance(axes, str) else tuple(axes or ())
        free = [a for a in wanted if a not in used and (sizes is None or sizes.get(a, 1) > 1)]
        while free and shape is not None and sizes is not None and \
                shape[dim] % math.prod(sizes[a] for a in free):
            free.pop()   # drop inner axes until the dim divides evenly
        if free:
            assigned[dim] = tuple(free)
            used.update(free)

    for dim, name in enumerate(names):   # direct mesh-axis names claim first
        if name in MESH_AXES:
            claim(dim, name)
    for rule_name, axes in table:
        for dim, name in enumerate(names):
            if name == rule_name and assigned[dim] is None and name not in MESH_AXES:
                claim(dim, axes)
    entries = [None if a is None else a[0] if len(a) == 1 else a for a in assigned]
    while entries and entries[-1] is None:   # canonical form: P() for replicated, P(None, "fsdp") ...
        entries.pop()
    return PartitionSpec(*entries)


def logical_to_sharding(logical_axes: Sequence[str | None] | None, mesh: Mesh,
                        rules: str | Sequence[tuple[str, MeshAxes]],
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with these logical axis names."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (batch, ...) input: batch rows split over ("data", "fsdp")."""
    return NamedSharding(mesh, PartitionSpec(BATCH_MESH_AXES, *([None] * (ndim - 1))))


# --------------------------------------------------------------------------- context

def _set_mesh(mesh: Mesh) -> contextlib.AbstractContextManager:
    """`jax.set_mesh` (jax >= 0.7) or its predecessor `jax.sharding.use_mesh`."""
    setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    if setter is None:   # very old jax: the Mesh object is itself the context manager
        return mesh
    return setter(mesh)


# Our rules live in our own context, not flax's `logical_axis_rules`: flax resolves names
# by plain dict lookup (no fallbacks, no de-duplication), so handing it these tables would
# make its eager per-Variable sharding build invalid specs such as ("fsdp", "fsdp").
_ACTIVE_RULES: contextvars.ContextVar[LogicalRules | None] = contextvars.ContextVar(
    "flaxchat_logical_rules", default=None)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: str | Sequence[tuple[str, MeshAxes]]) -> Iterator[Mesh]:
    """Make `mesh` current (jax.set_mesh) and the rules visible to `with_logical_constraint`."""
    token = _ACTIVE_RULES.set(get_rules(rules))
    try:
        with _set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE_RULES.reset(token)


def current_rules() -> LogicalRules | None:
    """The rules of the innermost `mesh_context`, or None outside one."""
    return _ACTIVE_RULES.get()


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Hint an activation's sharding by logical names (e.g. ("batch", "seq", "embed")).
    A no-op outside `mesh_context`, so model code runs unchanged on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = current_rules()
    if mesh is None or mesh.empty or rules is None:
        return x
    spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


# --------------------------------------------------------------------------- state sharding

def _no_eager_sharding() -> contextlib.AbstractContextManager:
    """Variables created inside don't shard themselves (flax >= 0.12 shards eagerly by default)."""
    toggle = getattr(nnx, "use_eager_sharding", None)
    return toggle(False) if toggle is not None else contextlib.nullcontext()


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _leaf_sharding(value: Any, logical: Any, mesh: Mesh, rules: LogicalRules) -> NamedSharding | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    if logical and len(logical) == len(shape):
        return logical_to_sharding(logical, mesh, rules, shape)
    # no annotation, or one that doesn't fit (e.g. a factored optimizer moment derived
    # from a matrix param): small enough to keep whole on every device
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(tree: Any, mesh: Mesh, rules: str | Sequence[tuple[str, MeshAxes]]) -> Any:
    """A NamedSharding for every array in an nnx State (or any pytree of Variables/arrays),
    read from each Variable's `out_sharding` logical names; same tree structure as `tree`."""
    table = get_rules(rules)

    def one(x: Any) -> Any:
        if _is_variable(x):
            logical = x.get_metadata().get("out_sharding")
            return x.replace(_leaf_sharding(x.get_value(), logical, mesh, table))
        return _leaf_sharding(x, None, mesh, table)

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def _abstract_split(factory: Callable[[], Any]) -> tuple[Any, Any]:
    """(graphdef, state of ShapeDtypeStructs) of what `factory` builds, allocating nothing.

    Plain `jax.eval_shape` rather than `nnx.eval_shape`: the latter attaches shardings
    from the raw logical names whenever a mesh is current, which fails on names such as
    "embed" that are not mesh axes."""
    graphdefs: list[Any] = []

    def build_state() -> Any:
        with _no_eager_sharding():
            graphdef, state = nnx.split(factory())
        graphdefs.append(graphdef)
        return state

    state = jax.eval_shape(build_state)
    return graphdefs[0], state


def abstract_state(factory: Callable[[], M], mesh: Mesh, rules: str | Sequence[tuple[str, MeshAxes]]
                   ) -> tuple[Any, Any]:
    """(graphdef, state of ShapeDtypeStructs carrying their target sharding), without
    allocating anything: the restore target for a sharded checkpoint."""
    graphdef, state = _abstract_split(factory)
    shardings = state_shardings(state, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            state, shardings)
    return graphdef, abstract


def create_sharded(factory: Callable[[], M], mesh: Mesh, rules: str | Sequence[tuple[str, MeshAxes]]) -> M:
    """Run `factory` (e.g. `lambda: GPT(cfg, nnx.Rngs(0))`) so every array comes out
    already sharded per the rules; no device ever holds a full copy of a sharded param.
    The factory runs twice (abstractly, then compiled), so it must build its own Rngs.

    flax's eager per-Variable sharding is switched off while tracing (it would need
    flax's rule lookup, see `_ACTIVE_RULES`); `out_shardings` places everything instead."""
    graphdef, abstract = _abstract_split(factory)
    shardings = state_shardings(abstract, mesh, rules)
    with mesh_context(mesh, rules), _no_eager_sharding():

        @functools.partial(jax.jit, out_shardings=shardings)
        def init() -> Any:
            return nnx.state(factory())

        state = init()
    return nnx.merge(graphdef, state)


def create_sharded_optimizer(model: nnx.Module, tx: Any, mesh: Mesh,
                             rules: str | Sequence[tuple[str, MeshAxes]],
                             wrt: Any = nnx.Param) -> nnx.Optimizer:
    """`nnx.Optimizer(model, tx, wrt=wrt)` with its state created sharded: moments that
    mirror a param inherit that param's logical names (flax copies the Variable
    metadata), everything else (step counts, factored moments) is replicated."""
    graphdef, params = nnx.split(model)

    def build(state: Any) -> nnx.Optimizer:
        return nnx.Optimizer(nnx.merge(graphdef, state), tx, wrt=wrt)

    opt_graphdef, abstract = _abstract_split(lambda: build(params))
    shardings = state_shardings(abstract, mesh, rules)
    with mesh_context(mesh, rules), _no_eager_sharding():
        init = jax.jit(lambda state: nnx.state(build(state)), out_shardings=shardings)
        opt_state = init(params)
    return nnx.merge(opt_graphdef, opt_state)


def shard_like_params(state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a plain (non-NNX) optax state: every subtree shaped like `params`
    (Adam's mu/nu, momentum, ...) gets `param_shardings` leaf by leaf where the shapes
    agree; all other leaves (counts, scalars, factored moments) are replicated."""
    params_def = jax.tree.structure(params)
    param_leaves = jax.tree.leaves(params)
    sharding_leaves = jax.tree.leaves(param_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if len(param_leaves) != len(sharding_leaves):
        raise ShardingRuleError(
            f"param_shardings has {len(sharding_leaves)} leaves but params has {len(param_leaves)}")
    replicated = NamedSharding(mesh, PartitionSpec())

    def visit(node: Any) -> Any:
        node_def = jax.tree.structure(node)
        if node_def.num_leaves == 0:   # None, EmptyState(), (): nothing to place
            return node
        if node_def == params_def:
            return jax.tree.unflatten(params_def, [
                s if np.shape(x) == np.shape(p) else replicated
                for x, p, s in zip(jax.tree.leaves(node), param_leaves, sharding_leaves)])
        if jax.tree_util.treedef_is_leaf(node_def):   # an array that mirrors no param
            return replicated
        children, one_level = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
        return jax.tree.unflatten(one_level, [visit(c) for c in children])

    return visit(state)
