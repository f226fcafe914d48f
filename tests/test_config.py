"""The config tree: presets, overrides, derived model shape, and errors that name the fix."""

import pytest

from flaxchat.config import ConfigError, PipelineConfig, build_config, parse_dotted


def test_depth_rules_follow_nanochat():
    # model_dim = depth*64 rounded up to a multiple of head_dim 128; n_head = dim/128
    for depth, dim in [(4, 256), (12, 768), (20, 1280), (24, 1536), (5, 384)]:
        cfg = build_config("climbmix", depth=depth)
        assert cfg.model.n_embd == dim
        assert cfg.model.n_head == dim // 128
        assert cfg.model.n_kv_head == cfg.model.n_head


def test_window_pattern_tiles_and_ends_long():
    cfg = build_config("climbmix", depth=6)
    assert cfg.model.window_sizes() == [512, 512, 512, 2048, 512, 2048]
    cfg = build_config("demo", dotted=["model.window_pattern=S"])
    assert cfg.model.window_sizes()[-1] == cfg.model.sequence_len
    assert cfg.model.window_sizes()[0] == 128  # ceil(256/4/128)*128


def test_vocab_flows_from_tokenizer_and_pads_to_64():
    cfg = build_config("demo", dotted=["tokenizer.vocab_size=1000"])
    assert cfg.model.vocab_size == 1000
    assert cfg.model.padded_vocab_size == 1024


def test_overrides_yaml_and_dotted_and_types():
    cfg = build_config("demo", overrides={"pretrain": {"num_steps": 7}, "seed": 3},
                       dotted=["model.remat=full", "pretrain.matrix_lr=0.01"])
    assert (cfg.pretrain.num_steps, cfg.seed, cfg.model.remat, cfg.pretrain.matrix_lr) == (7, 3, "full", 0.01)


@pytest.mark.parametrize("kwargs, needle", [
    ({"overrides": {"modle": {}}}, "did you mean 'model'"),
    ({"dotted": ["model.depht=3"]}, "did you mean 'model.depth'"),
    ({"dotted": ["pretrain.num_step=3"]}, "did you mean 'pretrain.num_steps'"),
    ({"dotted": ["model.depth=abc"]}, "model.depth='abc' has the wrong type"),
    ({"dotted": ["model.remat=sometimes"]}, "not one of"),
    ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"dotted": ["tokenizer.vocab_size=200"]}, "at least 265"),
    ({"dotted": ["model.n_embd=3"]}, "derived"),
    ({"dotted": ["model.n_kv_head=3"]}, "must divide"),
    ({"dotted": ["mesh.data=-1", "mesh.fsdp=-1"]}, "only one"),
    ({"dotted": ["model.window_pattern=SXL"]}, "may only contain"),
    ({"dotted": ["justakey"]}, "section.key=value"),
])
def test_bad_config_is_a_clear_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("'", "'")):
        build_config(**kwargs)


def test_resolved_tree_round_trips_through_a_dict():
    cfg = build_config("demo", depth=6)
    again = PipelineConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown config key"):
        PipelineConfig.from_dict({**cfg.to_dict(), "extra": 1})


def test_parse_dotted_nests():
    assert parse_dotted(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": "1"}, "d": "x"}}


def test_value_embedding_lr_follows_embedding_lr_unless_set():
    """nanochat ties the value-embedding LR to half the embedding LR; overriding embedding_lr alone
    must not silently keep the old 0.15."""
    assert build_config("demo").pretrain.value_embedding_lr == 0.15
    cfg = build_config("demo", dotted=["sft.embedding_lr=0.2"])
    assert cfg.sft.value_embedding_lr == 0.1 and cfg.pretrain.value_embedding_lr == 0.15
    assert build_config("demo", dotted=["sft.embedding_lr=0.2", "sft.value_embedding_lr=0.05"]).sft.value_embedding_lr == 0.05


def test_post_training_sections_carry_nanochats_recipes():
    cfg = build_config("climbmix")
    assert (cfg.sft.init_lr_frac, cfg.sft.warmup_steps, cfg.sft.warmdown_ratio, cfg.sft.final_lr_frac) == (0.8, 0, 0.5, 0.0)
    assert (cfg.sft.weight_decay, cfg.sft.momentum_warmup_steps, cfg.sft.momentum_peak) == (0.0, 300, 0.95)
    assert (cfg.sft.matrix_lr, cfg.sft.embedding_lr, cfg.sft.unembedding_lr) == (0.02, 0.3, 0.008)
    assert cfg.tasks.source == "nanochat" and build_config("demo").tasks.source == "demo"
    assert (cfg.rl.prompts_per_step, cfg.rl.samples_per_prompt, cfg.rl.top_k, cfg.rl.temperature) == (16, 16, 50, 1.0)


@pytest.mark.parametrize("dotted,needle", [
    (["rl.samples_per_prompt=1"], "needs rl.samples_per_prompt >= 2"),
    (["rl.samples_per_prompt=1", "rl.advantage=rloo"], "use rl.advantage=drgrpo"),
    (["rl.advantage=ppo"], "is not one of"),
    (["tasks.source=web"], "must be 'demo', 'nanochat' or 'auto'"),
])
def test_bad_post_training_config_is_a_clear_error(dotted, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as info:
        build_config("demo", dotted=dotted)
    assert "\n" not in str(info.value)
