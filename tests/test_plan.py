"""flaxchat.plan: the start step's plan (sizes, time, cost) and the stop for runs this machine can't do."""

import pytest

from flaxchat import plan
from flaxchat.config import ConfigError, build_config
from flaxchat.model import flops
from flaxchat.optim.scaling import plan_training

H100x8 = plan.Hardware("8x H100", 8, 989e12, 0.40, 11.06, local=False)
SLOW_CPU = plan.Hardware("local cpu (test)", 1, 50e9, 0.5, None, local=True)


def _everywhere(hw):
    return dict.fromkeys(plan.STAGES, hw)


def test_nanochat_preset_covers_its_tokens_with_shards_like_nanochat():
    # nanochat's speedrun downloads 170 shards for d24 at ratio 8; the default ratio 12 needs more
    d24 = build_config("nanochat", depth=24, overrides={"pretrain": {"target_param_data_ratio": 8.0}})
    assert 160 <= d24.data.num_shards <= 185
    assert build_config("nanochat", depth=24).data.num_shards > d24.data.num_shards
    assert build_config("nanochat", depth=12).data.num_shards < d24.data.num_shards
    assert build_config("nanochat").model.depth == 20 and build_config("nanochat").data.source == "climbmix"


def test_bad_shard_count_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.num_shards=1: use >= 2 .* or -1"):
        build_config("demo", overrides={"data": {"num_shards": 1}})


def test_pretrain_estimate_is_steps_times_batch_times_flops_per_token():
    cfg = build_config("nanochat", depth=12)
    p = plan.make_plan(cfg, _everywhere(H100x8))
    pt = plan_training(cfg.pretrain, cfg.model, 1)
    stage = {s.stage: s for s in p.stages}["pretrain"]
    assert (stage.steps, stage.global_batch) == (pt.num_steps, pt.total_batch_size)
    assert stage.tokens == pt.num_steps * pt.total_batch_size
    assert stage.flops == stage.tokens * flops.estimate_flops(cfg.model)
    assert stage.hours == pytest.approx(stage.flops / (8 * 989e12 * 0.40) / 3600)
    assert stage.cost_usd == pytest.approx(stage.hours * 8 * 11.06)
    # nanochat's d12 on 8 H100s is a matter of minutes to an hour, not days
    assert 0.05 < stage.hours < 2
    assert p.cost_usd == pytest.approx(sum(s.cost_usd for s in p.stages if s.hours))
    table = p.table()
    assert "pretrain" in table and "8x H100" in table and "40% of peak (MFU)" in table


def test_explicit_step_counts_are_used_as_given():
    cfg = build_config("demo", overrides={"sft": {"num_steps": 7}, "grpo": {"num_steps": 5}})
    stages = {s.stage: s for s in plan.make_plan(cfg, _everywhere(SLOW_CPU)).stages}
    assert stages["pretrain"].steps == cfg.pretrain.num_steps
    assert stages["sft"].steps == 7 and stages["grpo"].steps == 5
    assert stages["grpo"].tokens == 5 * cfg.rl.prompts_per_step * cfg.rl.samples_per_prompt * (
        plan.GRPO_PROMPT_TOKENS + cfg.rl.max_new_tokens)


def test_d24_on_a_cpu_is_stopped_with_the_estimate_and_the_override():
    cfg = build_config("nanochat", depth=24)
    hw = _everywhere(SLOW_CPU)
    p = plan.make_plan(cfg, hw)
    with pytest.raises(plan.PlanError, match=r"pretrain would take about [\d,]+ hours on local cpu .*--max-hours 0"):
        plan.check_feasible(p, hw, max_hours=24)
    plan.check_feasible(p, hw, max_hours=0)                       # the override
    plan.check_feasible(p, _everywhere(H100x8), max_hours=1)      # remote hardware is not this machine's problem


def test_demo_plan_fits_a_laptop():
    cfg = build_config("demo")
    hw = _everywhere(SLOW_CPU)
    p = plan.make_plan(cfg, hw)
    plan.check_feasible(p, hw, max_hours=1)
    assert p.cost_usd is None and 0 < p.hours < 1


def test_missing_stage_hardware_is_named():
    with pytest.raises(ConfigError, match="no hardware given for stage.*export"):
        plan.make_plan(build_config("demo"), {s: SLOW_CPU for s in plan.STAGES if s != "export"})


def test_local_cpu_hardware_is_measured():
    hw = plan.local_hardware()
    assert hw.local and hw.peak_flops > 1e8 and hw.name.startswith("local cpu")


def test_hardware_comes_from_the_compute_section():
    cfg = build_config("nanochat", depth=24, overrides={"compute": {
        "pretrain": {"kind": "tpu", "type": "v5p", "topology": "2x2x4"},
        "sft": {"kind": "gpu", "type": "h100", "count": 8}}})
    hw = plan.stage_hardware(cfg)
    assert (hw["pretrain"].chips, hw["pretrain"].peak_flops, hw["pretrain"].local) == (16, 459e12, False)
    assert "TPU v5p 2x2x4 (16 chips, 4 hosts)" == hw["pretrain"].name
    assert (hw["sft"].chips, hw["sft"].peak_flops, hw["sft"].price_per_chip_hour) == (8, 989e12, 11.06)
    assert hw["tokenizer"].local and hw["tokenizer"] is hw["eval"]        # measured once
    p = plan.make_plan(cfg, hw)
    stages = {s.stage: s for s in p.stages}
    assert stages["pretrain"].cost_usd == pytest.approx(stages["pretrain"].hours * 16 * plan.PRICE_PER_CHIP_HOUR["v5p"])
    # the d24 pretrain is off this machine: only the GRPO stage left local is checked (and is too slow here)
    with pytest.raises(plan.PlanError, match="^grpo would take"):
        plan.check_feasible(p, hw, max_hours=24)
