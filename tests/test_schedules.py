"""LR / momentum / weight-decay schedules and nanochat's depth-scaling rules (flaxchat.optim)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.config import ModelConfig, TrainConfig
from flaxchat.optim import (B_REF, ScalingError, ScheduleConfig, lr_multiplier, muon_momentum, num_scaling_params,
                            param_counts, plan_training, weight_decay_multiplier)
from flaxchat.optim.scaling import grad_accum_steps
from nanochat_schedules import nanochat_lrm, nanochat_momentum
from flaxchat.optim.schedules import ScheduleError


@pytest.mark.parametrize("n", [1000, 101, 7])
def test_schedules_match_nanochat_at_every_step(n):
    cfg = ScheduleConfig(num_steps=n)
    steps = jnp.arange(n + 1)
    np.testing.assert_allclose(lr_multiplier(steps, cfg), [nanochat_lrm(i, n) for i in range(n + 1)], rtol=1e-6)
    np.testing.assert_allclose(muon_momentum(steps, cfg), [nanochat_momentum(i, n) for i in range(n + 1)],
                               rtol=1e-6)
    np.testing.assert_allclose(weight_decay_multiplier(steps, cfg),
                               [0.5 * (1 + math.cos(math.pi * i / n)) for i in range(n + 1)], atol=1e-6)


def test_lr_multiplier_boundaries():
    cfg = ScheduleConfig(num_steps=1000, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)
    lrm = lambda i: float(lr_multiplier(i, cfg))
    assert lrm(0) == pytest.approx(1 / 40)
    assert lrm(38) == pytest.approx(39 / 40)
    assert lrm(39) == 1.0 and lrm(40) == 1.0
    assert cfg.warmdown_start == 350
    assert lrm(350) == 1.0                               # last flat step (nanochat's `<=`)
    assert lrm(351) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lrm(675) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lrm(1000) == pytest.approx(0.05)
    # warmdown_ratio 0: flat to the end, no division by zero
    flat = ScheduleConfig(num_steps=10, warmup_steps=0, warmdown_ratio=0.0)
    assert [float(lr_multiplier(i, flat)) for i in range(10)] == [1.0] * 10


def test_momentum_warmup_and_warmdown():
    cfg = ScheduleConfig(num_steps=2000)                 # warmdown starts at 700
    mom = lambda i: float(muon_momentum(i, cfg))
    assert mom(0) == pytest.approx(0.85)
    assert mom(200) == pytest.approx(0.91)
    assert mom(400) == pytest.approx(0.97) and mom(699) == pytest.approx(0.97)
    assert mom(700) == pytest.approx(0.97)
    assert mom(1350) == pytest.approx(0.935)
    assert mom(2000) == pytest.approx(0.90)
    # short run: the warmup branch wins where it overlaps the warmdown window
    short = ScheduleConfig(num_steps=100)
    assert float(muon_momentum(90, short)) == pytest.approx(0.85 + 0.12 * 90 / 400)


def test_weight_decay_cosine_to_zero():
    cfg = ScheduleConfig(num_steps=300)
    wd = lambda i: float(weight_decay_multiplier(i, cfg))
    assert wd(0) == pytest.approx(1.0)
    assert wd(150) == pytest.approx(0.5, abs=1e-6)
    assert wd(75) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-6)
    assert wd(300) == pytest.approx(0.0, abs=1e-6)


def test_schedules_are_jit_safe_on_traced_steps():
    cfg = ScheduleConfig(num_steps=50, warmup_steps=5)
    f = jax.jit(lambda s: (lr_multiplier(s, cfg), muon_momentum(s, cfg), weight_decay_multiplier(s, cfg)))
    out = [f(jnp.int32(i)) for i in (0, 4, 49)]
    assert float(out[0][0]) == pytest.approx(0.2) and float(out[1][0]) == pytest.approx(1.0)
    assert float(out[2][0]) == pytest.approx(nanochat_lrm(49, 50, warmup=5))


@pytest.mark.parametrize("kwargs", [dict(num_steps=0), dict(num_steps=10, warmdown_ratio=1.5),
                                    dict(num_steps=10, warmup_steps=-1)])
def test_schedule_config_rejects_bad_values(kwargs):
    with pytest.raises(ScheduleError):
        ScheduleConfig(**kwargs)


# ------------------------------------------------------------------ scaling rules

def model(depth: int, **kw) -> ModelConfig:
    cfg = ModelConfig(depth=depth, vocab_size=kw.pop("vocab_size", 32768), **kw)
    cfg.derive()
    return cfg


def contract_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """flaxchat.model.gpt's param contract, shapes only (stacked layers, value embeds on alternating layers)."""
    L, C, V = cfg.depth, cfg.n_embd, cfg.padded_vocab_size
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    n_ve = len([i for i in range(L) if i % 2 == (L - 1) % 2])
    return {
        "wte": (V, C), "lm_head": (C, V), "value_embeds": (n_ve, V, kv),
        "resid_lambdas": (L,), "x0_lambdas": (L,), "smear_gate": (24, 1), "smear_lambda": (), "backout_lambda": (),
        "blocks.attn.c_q": (L, C, q), "blocks.attn.c_k": (L, C, kv), "blocks.attn.c_v": (L, C, kv),
        "blocks.attn.c_proj": (L, q, C), "blocks.attn.ve_gate": (n_ve, 12, cfg.n_kv_head),
        "blocks.mlp.c_fc": (L, C, 4 * C), "blocks.mlp.c_proj": (L, 4 * C, C),
    }


@pytest.mark.parametrize("depth,kw", [(2, dict(vocab_size=300, head_dim=32)), (5, {}), (12, {}),
                                      (7, dict(n_kv_head=2, aspect_ratio=72, head_dim=64))])
def test_param_counts_match_contract_shapes(depth, kw):
    cfg = model(depth, **kw)
    shapes = contract_shapes(cfg)
    size = {k: math.prod(s) for k, s in shapes.items()}
    counts = param_counts(cfg)
    assert counts["wte"] == size["wte"] and counts["lm_head"] == size["lm_head"]
    assert counts["value_embeds"] == size["value_embeds"]
    assert counts["transformer_matrices"] == sum(v for k, v in size.items() if k.startswith("blocks."))
    assert counts["total"] == sum(size.values())
    assert num_scaling_params(cfg) == counts["transformer_matrices"] + counts["lm_head"]


def test_param_counts_match_real_model_when_present():
    gpt = pytest.importorskip("flaxchat.model.gpt", reason="flaxchat.model.gpt not importable")
    from flax import nnx
    cfg = model(3, vocab_size=300, head_dim=32)
    abstract = nnx.eval_shape(lambda: gpt.GPT(cfg, nnx.Rngs(0)))
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
    assert sum(sizes) == param_counts(cfg)["total"]


def test_d12_reference_reproduces_b_ref_and_unscaled_hparams():
    plan = plan_training(TrainConfig(), model(12), n_devices=8)
    assert plan.num_scaling_params == 12 * (4 * 768 ** 2 + 8 * 768 ** 2) + 6 * 12 * 6 + 768 * 32768
    assert plan.total_batch_size == B_REF
    assert plan.batch_lr_scale == 1.0
    assert plan.weight_decay == pytest.approx(0.28)
    assert plan.target_tokens == int(12 * plan.num_scaling_params)
    assert plan.num_steps == plan.target_tokens // B_REF
    assert plan.grad_accum_steps == 1                    # 32 x 2048 x 8 = 2**19


# nanochat dev/LOG.md "2026-02-05: Auto Batch Size Scaling": depth -> scaling params and auto batch
@pytest.mark.parametrize("depth,params_m,log2_batch", [
    (8, 42, 18), (10, 70, 19), (16, 235, 19), (18, 324, 20), (26, 918, 20), (32, 1678, 21), (50, 6249, 21)])
def test_auto_batch_size_matches_nanochat_log(depth, params_m, log2_batch):
    plan = plan_training(TrainConfig(), model(depth), n_devices=1)
    assert round(plan.num_scaling_params / 1e6) == params_m
    assert plan.total_batch_size == 2 ** log2_batch


def test_lr_and_wd_scaling_with_depth():
    base, ref = TrainConfig(), plan_training(TrainConfig(), model(12), 1)
    plan = plan_training(base, model(24), n_devices=1)
    ratio = plan.total_batch_size / B_REF
    assert plan.batch_lr_scale == pytest.approx(math.sqrt(ratio))
    assert plan.weight_decay == pytest.approx(0.28 * math.sqrt(ratio) * ref.target_tokens / plan.target_tokens,
                                              rel=1e-6)
    # speedrun ratio 8 changes tokens but not B/D ratios (D_ref uses the same ratio)
    speed = plan_training(dataclasses.replace(base, target_param_data_ratio=8.0), model(24), 1)
    assert speed.total_batch_size == plan.total_batch_size
    assert speed.target_tokens == int(8 * plan.num_scaling_params)


def test_explicit_overrides_and_grad_accum_errors():
    cfg = TrainConfig(num_steps=77, total_batch_size=2 ** 16, device_batch_size=4)
    plan = plan_training(cfg, model(4, sequence_len=1024), n_devices=2)
    assert plan.num_steps == 77 and plan.total_batch_size == 2 ** 16
    assert plan.grad_accum_steps == 2 ** 16 // (4 * 1024 * 2)
    assert plan.batch_lr_scale == pytest.approx(math.sqrt(2 ** 16 / B_REF))
    with pytest.raises(ScalingError, match="not a multiple"):
        grad_accum_steps(1000, 4, 128, 1)
    with pytest.raises(ScalingError, match="training horizon"):
        plan_training(TrainConfig(num_steps=-1, target_param_data_ratio=0), model(4), 1)
    with pytest.raises(ScalingError, match="one batch"):
        plan_training(TrainConfig(target_param_data_ratio=1e-6, total_batch_size=2 ** 20), model(4), 1)


def test_init_lr_frac_scales_the_whole_curve_and_momentum_knobs_apply():
    """nanochat's SFT: LRs at 0.8x with no warmup, warmdown over the last half to 0; momentum
    0.85 -> 0.95 over 300 steps and flat after (no warmdown dip)."""
    from flaxchat.config import sft_defaults
    cfg = ScheduleConfig.from_train(sft_defaults(), 1000)
    assert float(lr_multiplier(0, cfg)) == pytest.approx(0.8)
    assert float(lr_multiplier(500, cfg)) == pytest.approx(0.8)
    assert float(lr_multiplier(750, cfg)) == pytest.approx(0.8 * 0.5)
    assert float(lr_multiplier(1000, cfg)) == pytest.approx(0.0)
    assert float(muon_momentum(0, cfg)) == pytest.approx(0.85)
    assert float(muon_momentum(150, cfg)) == pytest.approx(0.90)
    assert float(muon_momentum(300, cfg)) == pytest.approx(0.95)
    assert float(muon_momentum(900, cfg)) == pytest.approx(0.95)
