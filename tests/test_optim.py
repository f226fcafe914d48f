"""Behaviour of the MuonAdamW optax port: LR schedule reach, group routing, Muon orientation, nnx use."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxchat.config import ModelConfig, TrainConfig
from flaxchat.optim import (AdamWGroup, MuonGroup, ParamGroupError, ScheduleConfig, build_optimizer,
                            group_assignment, muon_adamw, muon_lr_scale, nanochat_groups, second_moment_shape)
from flaxchat.optim.muon import polar_dtype_for

L, C, KV, V = 2, 32, 32, 64
MODEL = ModelConfig(depth=L, aspect_ratio=16, head_dim=16, vocab_size=V)

EXPECTED_GROUPS = {
    "wte": "wte", "lm_head": "lm_head", "value_embeds": "value_embeds", "resid_lambdas": "resid_lambdas",
    "x0_lambdas": "x0_lambdas", "smear_gate": "smear", "smear_lambda": "smear", "backout_lambda": "smear",
    "blocks.attn.c_q": "muon", "blocks.attn.c_k": "muon", "blocks.attn.c_v": "muon", "blocks.attn.c_proj": "muon",
    "blocks.attn.ve_gate": "muon", "blocks.mlp.c_fc": "muon", "blocks.mlp.c_proj": "muon",
}


def shapes() -> dict:
    return {
        "wte": (V, C), "lm_head": (C, V), "value_embeds": (1, V, KV), "resid_lambdas": (L,), "x0_lambdas": (L,),
        "smear_gate": (24, 1), "smear_lambda": (), "backout_lambda": (),
        "blocks": {"attn": {"c_q": (L, C, C), "c_k": (L, C, KV), "c_v": (L, C, KV), "c_proj": (L, C, C),
                            "ve_gate": (1, 12, 2)},
                   "mlp": {"c_fc": (L, C, 4 * C), "c_proj": (L, 4 * C, C)}},
    }


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    # NumPy, not jax.random: eager jax.random compiles once per shape, which dominates tiny tests
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes(),
                        is_leaf=lambda x: isinstance(x, tuple))


def one_update(tx: optax.GradientTransformation, count: int = 0):
    params, grads = random_tree(0), random_tree(1)
    state = tx.init(params)._replace(count=jnp.int32(count))
    updates, _ = jitted_update(tx)(grads, state, params)
    return params, updates


_JITTED: dict[int, tuple] = {}


def jitted_update(tx: optax.GradientTransformation):
    """One compile per transformation (the step count is traced, so counts share it)."""
    if id(tx) not in _JITTED:
        _JITTED[id(tx)] = (tx, jax.jit(tx.update))
    return _JITTED[id(tx)][1]


# warmup 2, warmdown over the last 2 of 10 steps to 0: lrm(0) = 0.5, lrm(10) = 0
HALF_THEN_ZERO = build_optimizer(TrainConfig(warmup_steps=2, warmdown_ratio=0.2, final_lr_frac=0.0), MODEL, 10,
                                 polar_dtype="float32")
FULL = build_optimizer(TrainConfig(warmup_steps=1, warmdown_ratio=0.2, final_lr_frac=0.0), MODEL, 10,
                       polar_dtype="float32")                                # lrm(0) = 1.0


# ------------------------------------------------------------------ LR multiplier reaches every group

def test_lr_multiplier_zero_leaves_every_param_unchanged():
    params, updates = one_update(HALF_THEN_ZERO, count=10)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        assert float(jnp.max(jnp.abs(u))) == 0.0, path
    moved = optax.apply_updates(params, updates)
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(moved), strict=True)
    assert all(bool(jnp.array_equal(a, b)) for a, b in pairs)


def test_lr_multiplier_half_halves_every_update():
    # same step (count 0), so the same momentum, wd and bias correction: only the LR multiplier differs
    _, full = one_update(FULL)
    _, half = one_update(HALF_THEN_ZERO)
    for (path, f), h in zip(jax.tree_util.tree_flatten_with_path(full)[0], jax.tree.leaves(half), strict=True):
        assert float(jnp.max(jnp.abs(f))) > 0, path
        np.testing.assert_allclose(h, 0.5 * f, rtol=1e-5, atol=1e-6, err_msg=str(path))


# ------------------------------------------------------------------ group routing

def test_every_standin_param_lands_in_its_group():
    assert group_assignment(random_tree(0), nanochat_groups(TrainConfig(), MODEL)) == EXPECTED_GROUPS


def test_nnx_embed_style_paths_route_by_top_level_name():
    groups = nanochat_groups(TrainConfig(), MODEL)
    tree = {"wte": {"embedding": jnp.zeros((V, C))}, "smear_gate": {"kernel": jnp.zeros((24, 1))},
            "blocks": {"mlp": {"c_fc": {"kernel": jnp.zeros((L, C, 4 * C))}}}}
    assert group_assignment(tree, groups) == {"wte.embedding": "wte", "smear_gate.kernel": "smear",
                                              "blocks.mlp.c_fc.kernel": "muon"}


def test_unknown_ambiguous_and_misshapen_params_are_errors():
    groups = nanochat_groups(TrainConfig(), MODEL)
    tree = random_tree(0)
    tree["mystery_bias"] = jnp.zeros((C,))
    with pytest.raises(ParamGroupError, match="'mystery_bias'.*matches no optimizer group"):
        build_optimizer(TrainConfig(), MODEL, 10).init(tree)
    overlapping = groups + (AdamWGroup("all_lambdas", r".*_lambdas", 0.1, (0.9, 0.9), 0.0),)
    with pytest.raises(ParamGroupError, match="'resid_lambdas' matches several"):
        group_assignment(random_tree(0), overlapping)
    flat_block = random_tree(0)
    flat_block["blocks"]["attn"]["c_q"] = jnp.zeros((C, C))                # unstacked: contract violation
    with pytest.raises(ParamGroupError, match="blocks.attn.c_q.*3-D stacked"):
        group_assignment(flat_block, groups)


def test_group_hyperparameters_follow_nanochat_table():
    train = TrainConfig()
    groups = {g.name: g for g in nanochat_groups(train, MODEL, batch_lr_scale=2.0, weight_decay=0.1)}
    s_d = (32 / 768) ** -0.5                                                # MODEL has n_embd 32
    assert groups["lm_head"].lr == pytest.approx(0.008 * 2 * s_d) and groups["lm_head"].betas == (0.8, 0.96)
    assert groups["wte"].lr == pytest.approx(0.3 * 2 * s_d) and groups["wte"].weight_decay == 0.001
    assert groups["value_embeds"].lr == pytest.approx(0.15 * 2 * s_d)
    assert groups["resid_lambdas"].lr == pytest.approx(0.01) and groups["resid_lambdas"].weight_decay == 0.05
    assert groups["x0_lambdas"].lr == pytest.approx(1.0) and groups["x0_lambdas"].betas == (0.96, 0.95)
    assert groups["smear"].lr == pytest.approx(0.2)                         # nanochat scales it by nothing
    assert all(g.eps == 1e-10 for g in groups.values() if isinstance(g, AdamWGroup))
    muon = groups["muon"]
    assert isinstance(muon, MuonGroup) and muon.lr == pytest.approx(0.04) and muon.weight_decay == 0.1
    assert muon.beta2 == 0.9 and muon.ns_steps == 5
    assert nanochat_groups(train, MODEL)[-1].weight_decay == train.weight_decay
    assert polar_dtype_for("auto", backend="gpu") == jnp.bfloat16
    assert polar_dtype_for("auto", backend="cpu") == jnp.float32


# ------------------------------------------------------------------ Muon orientation (Flax (in, out) layout)

def test_muon_lr_scale_and_factoring_use_the_output_dim():
    assert muon_lr_scale((L, 8, 32)) == 2.0            # c_fc-like: out = 4 * in  ->  sqrt(4)
    assert muon_lr_scale((L, 32, 8)) == 1.0            # c_proj-like: out < in
    assert second_moment_shape((L, 8, 32)) == (L, 1, 32)    # one statistic per output row
    assert second_moment_shape((L, 32, 8)) == (L, 32, 1)    # wide in torch terms: per input column


def test_muon_update_norm_shows_sqrt_rows_over_cols_orientation():
    """With wd 0, NorMuon keeps ||g||_F = sqrt(min(rows, cols)), so ||update|| = lr_eff * sqrt(min)."""
    lr = 0.01
    groups = (MuonGroup("m", r".*", lr, 0.0, polar_dtype="float32"),)
    tx = muon_adamw(groups, ScheduleConfig(num_steps=100, warmup_steps=0))
    for shape, scale in (((3, 8, 32), 2.0), ((3, 32, 8), 1.0)):
        p = {"w": normal(0, shape)}
        g = {"w": normal(1, shape)}
        u, _ = jitted_update(tx)(g, tx.init(p), p)
        norms = np.linalg.norm(np.asarray(u["w"]).reshape(3, -1), axis=1)
        np.testing.assert_allclose(norms, lr * scale * math.sqrt(8), rtol=1e-4, err_msg=str(shape))


def test_cautious_weight_decay_only_where_signs_agree():
    """Zero gradient -> Muon direction 0 everywhere -> mask (0 * p >= 0) is all True: pure decay.
    A large wd with the sign pattern of -p in the update shows the mask switching decay off."""
    groups = (MuonGroup("m", r".*", 0.1, 0.5, polar_dtype="float32"),)
    tx = muon_adamw(groups, ScheduleConfig(num_steps=100, warmup_steps=0))
    p = {"w": normal(0, (1, 16, 16))}
    u, _ = jitted_update(tx)({"w": jnp.zeros((1, 16, 16))}, tx.init(p), p)
    np.testing.assert_allclose(u["w"], -0.1 * 0.5 * p["w"], rtol=1e-6)
    u_with, _ = jitted_update(tx)({"w": p["w"]}, tx.init(p), p)             # grad aligned with p
    no_wd = muon_adamw((dataclasses.replace(groups[0], weight_decay=0.0),),
                       ScheduleConfig(num_steps=100, warmup_steps=0))
    u_none, _ = jitted_update(no_wd)({"w": p["w"]}, no_wd.init(p), p)
    decay = np.asarray(u_with["w"] - u_none["w"])
    muon_dir = -np.asarray(u_none["w"])                                     # = lr * g_final
    agree = muon_dir * np.asarray(p["w"]) >= 0
    np.testing.assert_allclose(decay[agree], (-0.05 * np.asarray(p["w"]))[agree], rtol=1e-5, atol=1e-7)
    assert np.all(decay[~agree] == 0) and (~agree).sum() > 0


# ------------------------------------------------------------------ nnx.Optimizer, jit, donation, sharding

class StandIn(nnx.Module):
    """A module with the model's param paths; its loss touches every param."""

    def __init__(self, seed: int = 0):
        tree = random_tree(seed)
        axes = lambda x: tuple(f"a{i}" for i in range(x.ndim))
        wrap = lambda x: nnx.Param(x, out_sharding=axes(x), eager_sharding=False)
        for name, value in tree.items():
            if name != "blocks":
                setattr(self, name, wrap(value))
        self.blocks = nnx.Dict({k: nnx.Dict({n: wrap(v) for n, v in d.items()})
                                for k, d in tree["blocks"].items()})

    def __call__(self, x):
        leaves = jax.tree.leaves(nnx.state(self, nnx.Param))
        return sum(jnp.sum(jnp.sin(leaf * x)) for leaf in leaves)


def test_nnx_optimizer_under_jit_with_donation():
    model = StandIn()
    tx = build_optimizer(TrainConfig(warmup_steps=1), MODEL, num_steps=10, polar_dtype="bfloat16")
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nu = opt.opt_state.nu
    assert nu["blocks"]["mlp"]["c_fc"].get_metadata("out_sharding") == ("a0", None, "a2")
    assert nu["blocks"]["mlp"]["c_proj"].get_metadata("out_sharding") == ("a0", "a1", None)
    assert opt.opt_state.mu["wte"].get_metadata("out_sharding") == ("a0", "a1")
    assert nu["blocks"]["mlp"]["c_fc"].shape == (L, 1, 4 * C)

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: m(x))(model)
        opt.update(model, grads)
        return loss

    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    losses = [float(train_step(model, opt, jnp.float32(0.3))) for _ in range(3)]
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert int(opt.opt_state.count[...]) == 3 and int(opt.step[...]) == 3
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after), strict=True):
        assert not np.array_equal(b, np.asarray(a)), f"{path} did not move"


def test_real_model_params_route_and_init_when_present():
    gpt = pytest.importorskip("flaxchat.model.gpt", reason="flaxchat.model.gpt not importable")
    cfg = dataclasses.replace(MODEL, vocab_size=300)
    abstract = nnx.eval_shape(lambda: gpt.GPT(cfg, nnx.Rngs(0)))
    assignment = group_assignment(nnx.state(abstract, nnx.Param), nanochat_groups(TrainConfig(), cfg))
    assert assignment == EXPECTED_GROUPS
    state = jax.eval_shape(build_optimizer(TrainConfig(), cfg, 10).init, nnx.state(abstract, nnx.Param))
    assert state.nu["blocks"]["attn"]["c_q"].shape == second_moment_shape(
        state.mu["blocks"]["attn"]["c_q"].shape)
