"""Named presets: partial config trees layered under user overrides.

`demo` is sized so the whole flow finishes on 2 CPU cores in minutes on generated data;
the real presets use the same code paths with nanochat's sizes.
"""

from typing import Any

from flaxchat.config import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # nanochat's recipe for any --depth (the flow's default): ClimbMix, vocab 32768, tokens = 12 x scaling
    # params, batch/LR/WD from nanochat's depth-scaling rules (flaxchat.optim.scaling), shards to cover them
    "nanochat": {
        "model": {"depth": 20},
        "tokenizer": {"vocab_size": 32768},
        "data": {"source": "climbmix", "num_shards": -1},
    },
    "demo": {
        "model": {"depth": 4, "aspect_ratio": 64, "head_dim": 64, "sequence_len": 256, "window_pattern": "SL"},
        "tokenizer": {"vocab_size": 1024, "max_chars": 20_000_000, "doc_cap": 4_000, "eval_chars": 200_000},
        "data": {"source": "demo", "demo_documents": 12_000, "demo_val_documents": 600},
        "pretrain": {"num_steps": 200, "device_batch_size": 8, "total_batch_size": 2048,
                     "batch_lr_scaling": False,
                     "warmup_steps": 20, "eval_every": 50, "eval_tokens": 32_768, "sample_every": 100,
                     "log_every": 10, "checkpoint_every": 50},
        "tasks": {"demo_conversations": 600, "demo_problems": 300, "demo_val": 200},
        "sft": {"device_batch_size": 8, "eval_every": 50, "eval_tokens": 16_384, "log_every": 10,
                "checkpoint_every": 50},
        "rl": {"prompts_per_step": 8, "samples_per_prompt": 8, "max_new_tokens": 64, "eval_problems": 128,
               "eval_samples": 4},
        # the demo's 64 samples per step are a noisy gradient; Muon takes full-size steps whatever the
        # gradient's scale, so the LR is what keeps RL from undoing SFT (0.3 dipped; 0.15 climbs steadily)
        "grpo": {"num_steps": 60, "init_lr_frac": 0.15, "device_batch_size": 16, "eval_every": 20,
                 "checkpoint_every": 20, "log_every": 1},
        "eval": {"core_bundle": "demo", "core_max_examples": 100, "chat_max_problems": 64, "max_new_tokens": 64},
    },
    "tinystories": {
        "model": {"depth": 8, "sequence_len": 512},
        "tokenizer": {"vocab_size": 8192, "max_chars": 500_000_000},
        "data": {"source": "tinystories", "num_shards": 4},
        "pretrain": {"device_batch_size": 32, "eval_every": 250},
    },
    "climbmix": {
        "model": {"depth": 20},
        "tokenizer": {"vocab_size": 32768},
        "data": {"source": "climbmix", "num_shards": 240},
    },
    "speedrun": {
        "model": {"depth": 24},
        "tokenizer": {"vocab_size": 32768},
        "data": {"source": "climbmix", "num_shards": 370},
        "pretrain": {"target_param_data_ratio": 8.0},
    },
}


def preset_overrides(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    import copy
    return copy.deepcopy(PRESETS[name])
