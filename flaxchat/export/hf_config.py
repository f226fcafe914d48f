"""config.json of a Hugging Face export, without torch or transformers.

An export directory holds model.safetensors (nanochat's state dict, flaxchat/export/layout.py),
config.json (`hf_config_dict`) and the two remote-code files `MODELING_FILES`, so that

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

builds `FlaxchatForCausalLM` (flaxchat/export/hf_modeling/modeling_flaxchat.py). The field names
here are the keyword arguments of `FlaxchatConfig` (hf_modeling/configuration_flaxchat.py); the
torch test tier (tests/test_export_hf_model.py) checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flaxchat.model.attention import ROPE_BASE
from flaxchat.model.gpt import ModelSpec

_HERE = Path(__file__).resolve().parent / "hf_modeling"
# copied next to config.json; transformers imports them by the names in AUTO_MAP
MODELING_FILES: tuple[Path, ...] = (_HERE / "configuration_flaxchat.py", _HERE / "modeling_flaxchat.py")
AUTO_MAP = {"AutoConfig": "configuration_flaxchat.FlaxchatConfig",
            "AutoModelForCausalLM": "modeling_flaxchat.FlaxchatForCausalLM"}


def hf_config_dict(spec: ModelSpec, *, bos_token_id: int | None, eos_token_id: int | list[int] | None) -> dict[str, Any]:
    """The config.json content for a model of shape `spec`. The weights are written in fp32."""
    return {
        "model_type": "flaxchat",
        "architectures": ["FlaxchatForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "torch_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "padded_vocab_size": spec.padded_vocab_size,
        "n_layer": spec.n_layer,
        "n_head": spec.n_head,
        "n_kv_head": spec.n_kv_head,
        "n_embd": spec.n_embd,
        "head_dim": spec.head_dim,
        "sequence_len": spec.sequence_len,
        "window_sizes": [int(w) for w in spec.windows],
        "softcap": float(spec.softcap),
        "rope_base": float(ROPE_BASE),   # not a ModelSpec field: fixed in flaxchat.model.attention
        "max_position_embeddings": spec.sequence_len,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "tie_word_embeddings": False,
    }
