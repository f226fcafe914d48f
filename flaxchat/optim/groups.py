"""Parameter groups and the combined MuonAdamW optax transformation (nanochat's `MuonAdamW`).

Every parameter is routed to exactly one group by an explicit regex on its dotted path
("blocks.attn.c_q", "wte", "smear_gate", ...): a path matching no rule, or two rules, is an
error that names it. There is no fallback optimizer.

Groups (nanochat gpt.py `setup_optimizer` + scripts/base_train.py):
  lm_head       AdamW  unembedding_lr * s_d * s_b          betas (0.8, 0.96)   wd 0.01
  wte           AdamW  embedding_lr * s_d * s_b            betas (0.8, 0.995)  wd 0.001
  value_embeds  AdamW  value_embedding_lr * s_d * s_b      betas (0.8, 0.995)  wd 0.01
  resid_lambdas AdamW  scalar_lr * s_b * 0.01              betas (0.8, 0.95)   wd 0.05
  x0_lambdas    AdamW  scalar_lr * s_b                     betas (0.96, 0.95)  wd 0
  smear         AdamW  smear_lr (nanochat scales it by nothing)  betas (0.8, 0.95) wd 0
  blocks.*      Muon   matrix_lr * s_b                     beta2 0.9, wd (scaled) cautious
with s_d = (n_embd/768)^-0.5 and s_b = sqrt(B/B_ref) (scaling.py); eps 1e-10 everywhere.

One step counter lives in the state and drives every schedule (schedules.py): the LR multiplier
for all groups, Muon's momentum and Muon's cosine weight decay. AdamW weight decay is constant
but multiplies the scheduled LR, as in nanochat. Hyperparameters are Python constants baked into
the compiled step (changing one recompiles), the step counter is traced.

Optimizer state (`MuonAdamWState`) and sharding:
  mu  AdamW exp_avg / Muon momentum buffer    -- same shape, dtype and metadata as each param
  nu  AdamW exp_avg_sq (same shape as param) / Muon factored NorMuon moment (the reduced axis is 1)
When initialised from an nnx State (as nnx.Optimizer does) the moments are Variables copying the
param's metadata, so they shard like the param; the factored moments get the param's
`out_sharding` names with the reduced axis set to None (replicated), which is what
flaxchat.mesh.state_shardings expects. Plain-array param trees get plain-array moments.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxchat.config import ModelConfig, TrainConfig
from flaxchat.optim.adamw import adamw_leaf_update
from flaxchat.optim.muon import muon_leaf_update, polar_dtype_for, second_moment_axis, second_moment_shape
from flaxchat.optim.schedules import ScheduleConfig, lr_multiplier, muon_momentum, weight_decay_multiplier


class ParamGroupError(ValueError):
    """A parameter path matches no group, or several, or has a shape its group cannot take."""


@dataclasses.dataclass(frozen=True)
class AdamWGroup:
    name: str
    pattern: str                      # regex, full match on the dotted param path
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    eps: float = 1e-10


@dataclasses.dataclass(frozen=True)
class MuonGroup:
    name: str
    pattern: str
    lr: float                         # before the per-matrix sqrt(max(1, rows/cols)) factor
    weight_decay: float               # base value; multiplied by the cosine schedule each step
    beta2: float = 0.9
    ns_steps: int = 5
    polar_dtype: str = "bfloat16"     # "bfloat16" | "float32"
    ndim: int = 3                     # leaves must be stacked matrices (L, in, out)


Group = AdamWGroup | MuonGroup


class MuonAdamWState(NamedTuple):
    count: jax.Array                  # int32 steps taken; the schedules read it
    mu: Any                           # first moments, mirrors params
    nu: Any                           # second moments, mirrors params (Muon leaves factored)


# --------------------------------------------------------------------------- assignment

def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_path(keypath: Sequence[Any]) -> str:
    """Dotted name of a pytree key path ('blocks.attn.c_q'); a trailing Variable `.value` is dropped."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return ".".join(_key_name(k) for k in keys)


def group_for(path: str, shape: Sequence[int], groups: Sequence[Group]) -> Group:
    """The one group whose pattern fully matches `path`; checks Muon leaves are stacked matrices."""
    hits = [g for g in groups if re.fullmatch(g.pattern, path)]
    if not hits:
        raise ParamGroupError(f"parameter '{path}' (shape {tuple(shape)}) matches no optimizer group; "
                              f"add a rule for it (groups: {', '.join(g.name for g in groups)})")
    if len(hits) > 1:
        raise ParamGroupError(f"parameter '{path}' matches several optimizer groups "
                              f"({', '.join(g.name for g in hits)}); make the rules disjoint")
    group = hits[0]
    if isinstance(group, MuonGroup) and len(shape) != group.ndim:
        raise ParamGroupError(f"parameter '{path}' has shape {tuple(shape)} but Muon group '{group.name}' "
                              f"needs {group.ndim}-D stacked matrices (layers, in, out)")
    return group


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _value(x: Any) -> Any:
    return x.get_value() if _is_variable(x) else x


def group_assignment(params: Any, groups: Sequence[Group]) -> dict[str, str]:
    """{param path: group name} for every leaf of `params` (raises on unmatched/ambiguous paths)."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
    return {param_path(kp): group_for(param_path(kp), jnp.shape(_value(x)), groups).name for kp, x in leaves}


# --------------------------------------------------------------------------- transformation

def _factored_metadata(leaf: Any, axis: int) -> dict[str, Any]:
    """The param's sharding names with the factored (size-1) axis replicated."""
    out = {}
    for key in ("out_sharding", "optimizer_sharding"):
        names = leaf.get_metadata().get(key)
        if isinstance(names, (tuple, list)) and len(names) == len(_value(leaf).shape):
            names = list(names)
            names[axis] = None
            out[key] = tuple(names)
    return out


def muon_adamw(groups: Sequence[Group], schedule: ScheduleConfig) -> optax.GradientTransformation:
    """nanochat's MuonAdamW as one optax transformation over a grouped param tree."""
    groups = tuple(groups)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ParamGroupError(f"optimizer group names must be unique, got {names}")

    def init(params: Any) -> MuonAdamWState:
        def first(kp: Any, leaf: Any) -> Any:
            value = _value(leaf)
            group_for(param_path(kp), value.shape, groups)      # fail at init, not mid-training
            zeros = jnp.zeros_like(value)
            return leaf.replace(zeros) if _is_variable(leaf) else zeros

        def second(kp: Any, leaf: Any) -> Any:
            value = _value(leaf)
            group = group_for(param_path(kp), value.shape, groups)
            if isinstance(group, AdamWGroup):
                zeros = jnp.zeros_like(value)
                return leaf.replace(zeros) if _is_variable(leaf) else zeros
            zeros = jnp.zeros(second_moment_shape(value.shape), value.dtype)
            if not _is_variable(leaf):
                return zeros
            axis = second_moment_axis(value.shape) % value.ndim
            return leaf.replace(zeros, **_factored_metadata(leaf, axis))

        mu = jax.tree_util.tree_map_with_path(first, params, is_leaf=_is_variable)
        nu = jax.tree_util.tree_map_with_path(second, params, is_leaf=_is_variable)
        return MuonAdamWState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update(updates: Any, state: MuonAdamWState, params: Any = None) -> tuple[Any, MuonAdamWState]:
        if params is None:
            raise ValueError("muon_adamw needs params (weight decay and the cautious mask read them): "
                             "call tx.update(grads, state, params)")
        count = state.count
        lrm = lr_multiplier(count, schedule)
        momentum = muon_momentum(count, schedule)
        wd_mult = weight_decay_multiplier(count, schedule)
        step = count + 1                                     # AdamW bias correction is 1-based

        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        p_leaves = treedef.flatten_up_to(params)
        mu_leaves = treedef.flatten_up_to(state.mu)
        nu_leaves = treedef.flatten_up_to(state.nu)
        out_u, out_mu, out_nu = [], [], []
        for (kp, grad), p, mu, nu in zip(flat, p_leaves, mu_leaves, nu_leaves, strict=True):
            group = group_for(param_path(kp), grad.shape, groups)
            if isinstance(group, AdamWGroup):
                u, mu, nu = adamw_leaf_update(
                    grad, p, mu, nu, step=step, lr=group.lr * lrm, beta1=group.betas[0],
                    beta2=group.betas[1], eps=group.eps, weight_decay=group.weight_decay)
            else:
                u, mu, nu = muon_leaf_update(
                    grad, p, mu, nu, lr=group.lr * lrm, momentum=momentum,
                    weight_decay=group.weight_decay * wd_mult, beta2=group.beta2,
                    ns_steps=group.ns_steps, polar_dtype=jnp.dtype(group.polar_dtype))
            out_u.append(u)
            out_mu.append(mu)
            out_nu.append(nu)
        new_state = MuonAdamWState(count=optax.safe_int32_increment(count),
                                   mu=treedef.unflatten(out_mu), nu=treedef.unflatten(out_nu))
        return treedef.unflatten(out_u), new_state

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- nanochat recipe

def nanochat_groups(train_cfg: TrainConfig, model_cfg: ModelConfig, batch_lr_scale: float = 1.0,
                    weight_decay: float | None = None, polar_dtype: str | None = None) -> tuple[Group, ...]:
    """nanochat's six AdamW groups plus one Muon group for every stacked block matrix."""
    n_embd = model_cfg.n_embd
    if n_embd == 0:                                          # unresolved config: derive a copy
        model_cfg = dataclasses.replace(model_cfg)
        model_cfg.derive()
        n_embd = model_cfg.n_embd
    dmodel_scale = (n_embd / 768) ** -0.5
    s_b = float(batch_lr_scale)
    wd = train_cfg.weight_decay if weight_decay is None else float(weight_decay)
    # unresolved (-1): nanochat's fixed ratio, half the embedding LR (config.resolve fills it in too)
    ve_lr = train_cfg.value_embedding_lr if train_cfg.value_embedding_lr >= 0 else train_cfg.embedding_lr / 2
    polar = str(polar_dtype_for(polar_dtype or model_cfg.compute_dtype))
    return (
        AdamWGroup("lm_head", r"lm_head(\..+)?", train_cfg.unembedding_lr * s_b * dmodel_scale, (0.8, 0.96), 0.01),
        AdamWGroup("wte", r"wte(\..+)?", train_cfg.embedding_lr * s_b * dmodel_scale, (0.8, 0.995), 0.001),
        AdamWGroup("value_embeds", r"value_embeds(\..+)?",
                   ve_lr * s_b * dmodel_scale, (0.8, 0.995), 0.01),
        AdamWGroup("resid_lambdas", r"resid_lambdas", train_cfg.scalar_lr * s_b * 0.01, (0.8, 0.95), 0.05),
        AdamWGroup("x0_lambdas", r"x0_lambdas", train_cfg.scalar_lr * s_b, (0.96, 0.95), 0.0),
        AdamWGroup("smear", r"(smear_gate|smear_lambda|backout_lambda)(\..+)?", train_cfg.smear_lr,
                   (0.8, 0.95), 0.0),
        MuonGroup("muon", r"blocks\..+", train_cfg.matrix_lr * s_b, wd, polar_dtype=polar),
    )


def build_optimizer(train_cfg: TrainConfig, model_cfg: ModelConfig, num_steps: int,
                    batch_lr_scale: float = 1.0, weight_decay: float | None = None, *,
                    polar_dtype: str | None = None) -> optax.GradientTransformation:
    """The pretraining optimizer: use as `nnx.Optimizer(model, tx, wrt=nnx.Param)`.

    `batch_lr_scale` and `weight_decay` come from scaling.plan_training (weight_decay=None means
    train_cfg.weight_decay unscaled). `polar_dtype` overrides the Polar Express dtype
    (default: bf16 when the model computes in bf16, fp32 otherwise, like nanochat)."""
    schedule = ScheduleConfig.from_train(train_cfg, num_steps)
    return muon_adamw(nanochat_groups(train_cfg, model_cfg, batch_lr_scale, weight_decay, polar_dtype), schedule)
