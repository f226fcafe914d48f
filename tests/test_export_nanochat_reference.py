"""nanochat's OWN code reads our nanochat export, and we read what nanochat's own code saves.

Needs torch and a nanochat source checkout (`NANOCHAT_SRC=<dir holding nanochat/>`; nothing of
nanochat is vendored here), so it sits in the torch tier and skips with its reason without them:

    NANOCHAT_SRC=/tmp/nanochat-src uv run pytest -q -m torch tests/test_export_nanochat_reference.py

Both directions compare logits (1e-4 relative, fp32) and 32 greedy tokens with our JAX model.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
SRC = os.environ.get("NANOCHAT_SRC", "")
if not os.path.isdir(os.path.join(SRC, "nanochat")):
    pytest.skip("set NANOCHAT_SRC to a nanochat checkout (git archive of karpathy/nanochat) to run these",
                allow_module_level=True)
sys.path.insert(0, SRC)

from flaxchat.export import parity  # noqa: E402
from flaxchat.export.nanochat_format import write_checkpoint  # noqa: E402
from flaxchat.model.gpt import ModelSpec  # noqa: E402
from test_export_nanochat import random_params, tiny_config  # noqa: E402
from tiny_models import tiny_tokenizer  # noqa: E402


def _nanochat_logits(model):
    def run(ids):
        with torch.no_grad():
            return model(torch.as_tensor(ids, dtype=torch.long)).float().numpy()
    return run


def test_nanochat_loads_our_export_and_computes_the_same_model(tmp_path, monkeypatch):
    cfg, tok = tiny_config(), tiny_tokenizer()
    params = random_params(cfg)
    write_checkpoint(params, cfg, tok, str(tmp_path), stage="sft", step=3)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    from nanochat.checkpoint_manager import load_model
    model, nc_tok, meta = load_model("sft", torch.device("cpu"), phase="eval")
    assert meta["step"] == 3 and nc_tok.get_vocab_size() == tok.vocab_size
    ours = parity.jax_logits_fn(params, ModelSpec.from_config(cfg, backend="cpu"))
    ids = parity.probe_ids(ModelSpec.from_config(cfg, backend="cpu"))
    assert parity.relative_error(_nanochat_logits(model)(ids), ours(ids)) < 1e-4
    prompt = tok.encode("the cat sat", prepend="<|bos|>")
    assert nc_tok.encode("the cat sat", prepend="<|bos|>") == prompt
    theirs = list(model.generate(prompt, max_tokens=32, temperature=0.0))
    assert theirs == parity.greedy_ids(ours, prompt, 32, pad_to=len(prompt) + 32)


def test_we_import_what_nanochat_saves(tmp_path):
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from steps.import_nanochat import import_checkpoint
    from flaxchat.chat.loading import load_chat_model
    cfg, tok = tiny_config(), tiny_tokenizer()
    torch.manual_seed(0)
    kwargs = {"sequence_len": 64, "vocab_size": tok.vocab_size, "n_layer": 3, "n_head": 3, "n_kv_head": 3,
              "n_embd": 96, "window_pattern": "SL"}
    model = GPT(GPTConfig(**kwargs))
    model.init_weights()
    with torch.no_grad():                       # make every feature live (init zeroes projections and smear)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p.float()).to(p.dtype))
    model.float()
    ckpt = tmp_path / "base_checkpoints" / "d3"
    save_checkpoint(str(ckpt), 9, model.state_dict(), None, {"step": 9, "model_config": kwargs})
    write_checkpoint(random_params(cfg), cfg, tok, str(tmp_path / "tokdonor"), stage="pretrain", step=0)
    manifest = import_checkpoint(str(ckpt), str(tmp_path / "imported"), tokenizer_dir=str(tmp_path / "tokdonor/tokenizer"))
    loaded = load_chat_model(manifest["uri"])
    ours = parity.jax_logits_fn(loaded.model.param_tree(), loaded.model.spec)
    ids = parity.probe_ids(loaded.model.spec)
    assert parity.relative_error(_nanochat_logits(model.eval())(ids), ours(ids)) < 1e-4
