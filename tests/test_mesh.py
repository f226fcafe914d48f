"""Mesh core: mesh sizes, logical-axis rules, sharded creation, and 1-vs-8-device equality.

The 8-device checks need `--xla_force_host_platform_device_count=8` set before JAX
starts, which another test may already have done in this pytest process; so they run
once in a fresh interpreter (this file, run as a script with `--worker`) that prints a
JSON report, and the tests below assert on it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
N_DEVICES = 8

# (name, MeshConfig kwargs): the parallelism layouts that must reproduce the 1-device numbers
LAYOUTS = {
    "dp": {"data": 8, "fsdp": 1, "tensor": 1, "rules": "replicated"},
    "fsdp": {"data": 1, "fsdp": 8, "tensor": 1, "rules": "fsdp"},
    "dp_fsdp": {"data": 2, "fsdp": 4, "tensor": 1, "rules": "fsdp"},
    "fsdp_tp": {"data": 1, "fsdp": 4, "tensor": 2, "rules": "fsdp_tp"},
}

# Expected PartitionSpecs (trailing Nones dropped) of the real GPT's params per layout
FSDP_SPECS = {
    "wte": [None, "fsdp"], "lm_head": ["fsdp"], "value_embeds": [None, "fsdp"],
    "blocks.attn.c_q": [None, "fsdp"], "blocks.attn.c_k": [None, "fsdp"], "blocks.attn.c_v": [None, "fsdp"],
    "blocks.attn.c_proj": [None, None, "fsdp"], "blocks.mlp.c_fc": [None, "fsdp"],
    "blocks.mlp.c_proj": [None, None, "fsdp"], "blocks.attn.ve_gate": [], "resid_lambdas": [],
    "smear_gate": [], "smear_lambda": [],
}
FSDP_TP_SPECS = {
    "wte": ["tensor", "fsdp"], "lm_head": ["fsdp", "tensor"], "value_embeds": [None, "fsdp", "tensor"],
    "blocks.attn.c_q": [None, "fsdp", "tensor"], "blocks.attn.c_k": [None, "fsdp", "tensor"],
    "blocks.attn.c_proj": [None, "tensor", "fsdp"], "blocks.mlp.c_fc": [None, "fsdp", "tensor"],
    "blocks.mlp.c_proj": [None, "tensor", "fsdp"], "blocks.attn.ve_gate": [], "x0_lambdas": [],
}
EXPECTED_SPECS = {"dp": {}, "fsdp": FSDP_SPECS, "dp_fsdp": FSDP_SPECS, "fsdp_tp": FSDP_TP_SPECS}


# --------------------------------------------------------------------------- in-process checks

def test_mesh_shape_fills_the_rest_and_rejects_bad_sizes():
    from flaxchat.config import MeshConfig
    from flaxchat.mesh import MeshShapeError, mesh_shape
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=1, fsdp=8, tensor=1), 8) == (1, 8, 1)
    with pytest.raises(MeshShapeError, match=r"fsdp=3.*does not divide 8"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(MeshShapeError, match=r"needs 4 devices but 8 exist"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(MeshShapeError, match="only one mesh axis may be -1"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)


def test_logical_rules_priority_fallback_and_divisibility():
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from flaxchat.mesh import ShardingRuleError, get_rules, logical_to_spec
    mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))
    # embed claims fsdp before vocab; a table without embed falls back to vocab -> fsdp
    assert logical_to_spec(("vocab", "embed"), "fsdp", mesh, (256, 64)) == P(None, "fsdp")
    assert logical_to_spec(("layers", "vocab", "kv"), "fsdp", mesh, (1, 256, 64)) == P(None, "fsdp")
    # fsdp_tp: a mesh axis is never used twice in one spec (vocab and kv both want tensor)
    assert logical_to_spec(("layers", "vocab", "kv"), "fsdp_tp", mesh, (1, 256, 64)) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), "fsdp_tp", mesh, (256, 64)) == P("tensor", "fsdp")
    # a dim that does not divide stays whole instead of making jit reject the sharding
    assert logical_to_spec(("embed", "mlp"), "fsdp_tp", mesh, (6, 256)) == P(None, "tensor")
    # size-1 mesh axes shard nothing; everything replicated under "replicated"
    assert logical_to_spec(("batch", "seq"), "fsdp", AbstractMesh((4, 1, 2), ("data", "fsdp", "tensor")),
                           (8, 64)) == P("data")
    assert logical_to_spec(("batch", None), "fsdp", AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor")),
                           (8, 3)) == P(("data", "fsdp"))
    assert logical_to_spec(("vocab", "embed"), "replicated", mesh, (256, 64)) == P()
    assert logical_to_spec(None, "fsdp", mesh) == P()
    with pytest.raises(ShardingRuleError, match="unknown sharding rules 'zero3'"):
        get_rules("zero3")
    with pytest.raises(ShardingRuleError, match="mesh axes are"):
        get_rules([("embed", "model")])


def test_shard_like_params_maps_mirrors_and_replicates_the_rest():
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from flaxchat.mesh import shard_like_params
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    params = {"w": np.zeros((4, 8), np.float32), "b": np.zeros((8,), np.float32)}
    shardings = {"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())}
    state = optax.adamw(1e-3).init(params)
    out = shard_like_params(state, params, shardings, mesh)
    adam = out[0]
    assert adam.mu["w"].spec == P("fsdp") and adam.nu["w"].spec == P("fsdp")
    assert adam.count.spec == P()
    assert jax.tree.structure(out) == jax.tree.structure(state)


def test_host_batch_slice():
    from flaxchat.batches import BatchShapeError, host_batch_slice
    assert host_batch_slice(8, 1, 2) == slice(4, 8)
    assert host_batch_slice(8, 0, 1) == slice(0, 8)
    with pytest.raises(BatchShapeError, match="does not split evenly over 3 hosts"):
        host_batch_slice(8, 0, 3)
    with pytest.raises(BatchShapeError, match="outside"):
        host_batch_slice(8, 2, 2)


# --------------------------------------------------------------------------- the 8-device run

@pytest.fixture(scope="module")
def report() -> dict:
    # the lower XLA backend optimisation level only shortens CPU compiles (the run is ~6 compiles)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES} "
                        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1])


def test_make_mesh_over_all_devices(report):
    assert report["device_count"] == N_DEVICES
    assert report["mesh_rest"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert "fsdp=3" in report["mesh_error"] and "8" in report["mesh_error"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_params_are_created_sharded(report, layout):
    params = report["layouts"][layout]["params"]
    for name, spec in EXPECTED_SPECS[layout].items():
        assert params[name]["spec"] == spec, f"{layout}: {name} has spec {params[name]['spec']}, want {spec}"
    for name, p in params.items():
        sharded = any(entry is not None for entry in p["spec"])
        if layout == "dp":
            assert not sharded, f"{name} sharded under pure data parallel: {p['spec']}"
        if sharded:   # every device holds only its slice, never the full array
            sizes = LAYOUTS[layout]
            want = [dim // math.prod(sizes[a] for a in ([] if e is None else [e] if isinstance(e, str) else e))
                    for dim, e in zip(p["shape"], p["spec"] + [None] * len(p["shape"]))]
            assert p["shard_shape"] == want and want != p["shape"], \
                f"{layout}: {name} shard {p['shard_shape']} of {p['shape']}, want {want}"
    sharded_elems = sum(p["elems"] for p in params.values() if any(e is not None for e in p["spec"]))
    total = sum(p["elems"] for p in params.values())
    if layout != "dp":
        assert sharded_elems > 0.95 * total, "the big matrices and tables must all be sharded"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_init_equals_single_device_init(report, layout):
    assert report["layouts"][layout]["init_max_abs_diff"] == 0.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_and_grads_match_single_device(report, layout):
    ref, got = report["reference"], report["layouts"][layout]
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * max(1.0, abs(ref["loss"]))
    for name, diff in got["grad_max_abs_diff"].items():
        scale = ref["grad_max_abs"][name]
        # fp32 relative 1e-5, plus an absolute floor for grads that are themselves at rounding
        # level (backout_lambda's is ~1e-8: a sum of cancelling terms)
        assert diff <= 1e-5 * scale + 1e-7, f"{layout}: grad of {name} differs by {diff} (scale {scale})"
    assert max(ref["grad_max_abs"].values()) > 1e-3, "reference grads are all ~0: the check would be vacuous"


def test_abstract_state_carries_the_same_shardings(report):
    assert report["abstract_specs_match"] is True


def test_optimizer_state_is_sharded_like_params(report):
    opt = report["optimizer"]
    assert opt["mirrors"] >= 2 * 10, "adam's mu and nu should mirror every param"
    assert opt["mismatched"] == [], f"opt-state leaves not sharded like their param: {opt['mismatched']}"
    assert opt["count_spec"] == []


def test_make_global_batch(report):
    # stacked (accum, rows, T) micro-batches: rows is the sharded dim
    assert report["stacked_batch"] == {"shape": [2, 8, 4], "spec": [None, ["data", "fsdp"]],
                                       "shard_shape": [2, 1, 4]}
    assert "6 rows" in report["batch_error"] and "multiple of 8" in report["batch_error"]


def test_with_logical_constraint_shards_activations(report):
    assert report["constraint_spec"] == [["data", "fsdp"]]
    assert report["constraint_outside_mesh_is_noop"]


# --------------------------------------------------------------------------- worker (subprocess)

def _spec_list(sharding) -> list:
    entries = [list(e) if isinstance(e, tuple) else e for e in sharding.spec]
    while entries and entries[-1] is None:
        entries.pop()
    return entries


def _worker() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    sys.path.insert(0, str(TESTS))
    import _dist_worker as helpers
    from jax.sharding import PartitionSpec as P

    from flaxchat.batches import BatchShapeError, make_global_batch
    from flaxchat.config import MeshConfig
    from flaxchat.mesh import (
        MeshShapeError,
        abstract_state,
        create_sharded,
        create_sharded_optimizer,
        make_mesh,
        mesh_context,
        with_logical_constraint,
    )

    devices = jax.devices()
    out: dict = {"device_count": len(devices)}
    out["mesh_rest"] = dict(make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1)).shape)
    try:
        make_mesh(MeshConfig(data=-1, fsdp=3))
        out["mesh_error"] = ""
    except MeshShapeError as err:
        out["mesh_error"] = str(err)

    factory = helpers.tiny_model_factory()
    idx, targets = helpers.fixed_batch(global_batch=N_DEVICES)

    def named(tree) -> dict:
        return dict(zip(helpers.leaf_names(tree), jax.tree.leaves(tree)))

    def run(mesh, rules):
        """-> (model, params as created, loss, grads at perturbed params)."""
        model = create_sharded(factory, mesh, rules)
        grad_fn, _, params, _ = helpers.loss_and_grad_fn(model)
        batch = make_global_batch({"idx": idx, "targets": targets}, mesh)
        loss, grads = grad_fn(helpers.perturbed(params), batch["idx"], batch["targets"])
        return model, params, float(loss), {k: np.asarray(v) for k, v in named(grads).items()}

    ref_mesh = make_mesh(MeshConfig(data=1), devices=devices[:1])
    _, ref_params, ref_loss, ref_grads = run(ref_mesh, "replicated")
    ref_values = {k: np.asarray(v) for k, v in named(ref_params).items()}
    out["reference"] = {"loss": ref_loss, "grad_max_abs": {k: float(np.abs(g).max()) for k, g in ref_grads.items()}}

    out["layouts"] = {}
    for name, kw in LAYOUTS.items():
        mesh = make_mesh(MeshConfig(**kw))
        model, params, loss, grads = run(mesh, kw["rules"])
        info = {}
        for pname, leaf in named(params).items():
            shard = leaf.addressable_shards[0].data
            info[pname] = {"spec": _spec_list(leaf.sharding), "shape": list(leaf.shape),
                           "shard_shape": list(shard.shape), "elems": int(leaf.size)}
        out["layouts"][name] = {
            "params": info, "loss": loss,
            "init_max_abs_diff": max(float(np.abs(np.asarray(v) - ref_values[k]).max())
                                     for k, v in named(params).items()),
            "grad_max_abs_diff": {k: float(np.abs(g - ref_grads[k]).max()) for k, g in grads.items()},
        }
        if name == "fsdp_tp":   # the checkpoint-restore target must promise the same placement
            _, target = abstract_state(factory, mesh, kw["rules"])
            targets = named(nnx.state(target, nnx.Param))
            out["abstract_specs_match"] = len(targets) == len(info) and all(
                _spec_list(t.sharding) == info[k]["spec"] and list(t.shape) == info[k]["shape"]
                for k, t in targets.items())
        if name == "dp_fsdp":
            optimizer = create_sharded_optimizer(model, optax.adamw(1e-3), mesh, kw["rules"])
            param_specs = {k: v["spec"] for k, v in info.items()}
            mirrors, mismatched, count_spec = 0, [], None
            for path, leaf in named(nnx.state(optimizer)).items():
                tail = next((p for p in param_specs if path.endswith(p)), None)
                if tail is not None and leaf.shape == tuple(info[tail]["shape"]):
                    mirrors += 1
                    if _spec_list(leaf.sharding) != param_specs[tail]:
                        mismatched.append(path)
                elif path.endswith("count"):
                    count_spec = _spec_list(leaf.sharding)
            out["optimizer"] = {"mirrors": mirrors, "mismatched": mismatched, "count_spec": count_spec}

    mesh = make_mesh(MeshConfig(**LAYOUTS["dp_fsdp"]))
    stacked = make_global_batch(np.zeros((2, 8, 4), np.int32), mesh, P(None, ("data", "fsdp")))
    out["stacked_batch"] = {"shape": list(stacked.shape), "spec": _spec_list(stacked.sharding),
                            "shard_shape": list(stacked.addressable_shards[0].data.shape)}
    try:
        make_global_batch(np.zeros((6, 4), np.int32), mesh)
        out["batch_error"] = ""
    except BatchShapeError as err:
        out["batch_error"] = str(err)
    x = jnp.zeros((8, 3))
    with mesh_context(mesh, "fsdp"):
        y = jax.jit(lambda a: with_logical_constraint(a * 2, ("batch", None)))(x)
    out["constraint_spec"] = _spec_list(y.sharding)
    out["constraint_outside_mesh_is_noop"] = with_logical_constraint(x, ("batch", None)) is x
    return out


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()), flush=True)
