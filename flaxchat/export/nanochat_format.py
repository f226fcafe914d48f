"""nanochat's own checkpoint layout, written and read without torch.

Written so that nanochat's scripts evaluate or chat with a model trained here: point
`NANOCHAT_BASE_DIR` at the export's `nanochat/` folder, which holds what nanochat's
`checkpoint_manager.load_model(source, …)` and `get_tokenizer()` read:

  tokenizer/tokenizer.pkl            a pickled `tiktoken.Encoding` (nanochat's RustBPETokenizer.save)
  tokenizer/token_bytes.pt           int32 bytes per token, 0 for specials (tok_train.py), for bits/byte
  <stage dir>/d<depth>/model_<step:06d>.pt   torch.save(state_dict): nanochat's names, (out, in) layouts
  <stage dir>/d<depth>/meta_<step:06d>.json  {"step", "model_config": GPTConfig kwargs, …}

with <stage dir> = base_checkpoints (pretrain), chatsft_checkpoints (sft) or chatrl_checkpoints
(grpo), nanochat's names for the same stages. No optimizer file: nanochat reads one only to resume
training. Weights are written in fp32 (our masters); nanochat casts as it loads.

Reading goes the other way (`read_checkpoint`), so nanochat's published checkpoints can be
fine-tuned here; the tokenizer pickle is read by a restricted unpickler that builds nothing but the
Encoding's plain state, so opening a downloaded checkpoint cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from typing import Any

import numpy as np

from flaxchat.config import ModelConfig
from flaxchat.export.layout import LayoutError, from_state_dict, model_config_from_nanochat, nanochat_model_config, to_state_dict
from flaxchat.export.torch_pickle import load_state_dict, save_state_dict
from flaxchat.model.gpt import ModelSpec
from flaxchat.tokenizer import Tokenizer
from flaxchat.tokenizer_specials import SPECIAL_TOKENS

STAGE_DIRS = {"pretrain": "base_checkpoints", "sft": "chatsft_checkpoints", "grpo": "chatrl_checkpoints"}
_MODEL_FILE = re.compile(r"model_(\d+)\.pt$")


def write_checkpoint(params: dict[str, Any], model_cfg: ModelConfig, tokenizer: Tokenizer, directory: str, *,
                     stage: str, step: int, meta: dict[str, Any] | None = None) -> list[str]:
    """Write the nanochat base dir under `directory`; returns the relative paths written."""
    spec = ModelSpec.from_config(model_cfg, backend="cpu")
    ckpt = os.path.join(STAGE_DIRS[stage], f"d{model_cfg.depth}")
    written = []
    os.makedirs(os.path.join(directory, ckpt), exist_ok=True)
    model_rel = os.path.join(ckpt, f"model_{step:06d}.pt")
    save_state_dict(to_state_dict(params, spec), os.path.join(directory, model_rel))
    meta_rel = os.path.join(ckpt, f"meta_{step:06d}.json")
    body = {"step": step, "model_config": nanochat_model_config(model_cfg), **(meta or {})}
    with open(os.path.join(directory, meta_rel), "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=2, default=float)
    written += [model_rel, meta_rel]
    tok_dir = os.path.join(directory, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "tokenizer.pkl"), "wb") as fh:
        pickle.dump(tokenizer._enc, fh)      # exactly what nanochat's RustBPETokenizer.save pickles
    save_state_dict({"": tokenizer.token_bytes()}, os.path.join(tok_dir, "token_bytes.pt"), bare_tensor=True)
    return written + ["tokenizer/tokenizer.pkl", "tokenizer/token_bytes.pt"]


# ------------------------------------------------------------------------------------- reading

class _EncodingState:
    """Stands in for tiktoken.Encoding while unpickling: keeps the state dict, runs nothing."""
    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a tokenizer pickle")


def read_tokenizer(tokenizer_dir: str) -> Tokenizer:
    """nanochat's tokenizer.pkl -> our Tokenizer (same ranks, pattern and special-token ids)."""
    path = os.path.join(tokenizer_dir, "tokenizer.pkl")
    try:
        with open(path, "rb") as fh:
            obj = _TokenizerUnpickler(io.BytesIO(fh.read())).load()
        state = obj.state
        ranks, pattern, specials = state["mergeable_ranks"], state["pat_str"], state["special_tokens"]
    except FileNotFoundError:
        raise LayoutError(f"no tokenizer at {path}: pass --tokenizer pointing at nanochat's tokenizer/ "
                          f"directory (it holds tokenizer.pkl)") from None
    except (pickle.UnpicklingError, AttributeError, KeyError, EOFError, TypeError) as exc:
        raise LayoutError(f"{path} is not a nanochat tokenizer pickle ({exc})") from None
    want = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if dict(specials) != want:
        raise LayoutError(f"{path}: special tokens {dict(specials)} differ from nanochat's {want}; "
                          f"this tokenizer was not made by nanochat's tok_train.py")
    return Tokenizer(dict(ranks), pattern)


def last_step(checkpoint_dir: str) -> int:
    steps = [int(m.group(1)) for f in os.listdir(checkpoint_dir) if (m := _MODEL_FILE.search(f))]
    if not steps:
        raise LayoutError(f"no model_<step>.pt in {checkpoint_dir}: point at a nanochat checkpoint directory "
                          f"such as <base dir>/base_checkpoints/d20")
    return max(steps)


def read_checkpoint(checkpoint_dir: str, step: int | None = None) -> tuple[dict[str, Any], ModelConfig, dict[str, Any]]:
    """(our param tree as NumPy fp32, our ModelConfig, nanochat's meta dict) from a nanochat checkpoint."""
    if not os.path.isdir(checkpoint_dir):
        raise LayoutError(f"{checkpoint_dir} is not a directory: point at a nanochat checkpoint directory")
    step = last_step(checkpoint_dir) if step is None else int(step)
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    for path in (meta_path, model_path):
        if not os.path.exists(path):
            raise LayoutError(f"{path} is missing: step {step} is not a complete nanochat checkpoint")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    cfg = model_config_from_nanochat(meta.get("model_config") or {}, meta_path)
    spec = ModelSpec.from_config(cfg, backend="cpu")
    state = load_state_dict(model_path)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    # nanochat's own loader patches these into checkpoints older than the per-layer scalars
    state.setdefault("resid_lambdas", np.ones(cfg.depth, np.float32))
    state.setdefault("x0_lambdas", np.zeros(cfg.depth, np.float32))
    return from_state_dict(state, spec, model_path), cfg, meta
