"""The export formats: each writes one folder from a trained model and checks itself against JAX.

A writer takes the model (NumPy fp32 params, resolved config, tokenizer) and a fresh local folder,
writes its files there and returns what the export manifest records about it. A checker loads what
was written with the format's own runtime (transformers, onnxruntime, ai-edge-litert; the
nanochat checkpoint is read back by our torch-free reader) and compares it with the JAX model
(`flaxchat.export.parity`). A runtime that is not installed makes the checker report a one-line
skip naming the extra to install; the files are still written where the writer needs nothing
optional (hf, nanochat), while onnx and litert need their converters to write at all.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
from typing import Any

import numpy as np

from flaxchat.config import ModelConfig
from flaxchat.export import parity
from flaxchat.model.gpt import ModelSpec
from flaxchat.tokenizer import Tokenizer


class FormatUnavailable(RuntimeError):
    """A format's optional dependency is missing; the message names the extra to install."""


@dataclasses.dataclass
class ExportModel:
    """What every writer needs: the model as NumPy fp32 and what produced it."""
    params: dict[str, Any]
    model_config: ModelConfig
    tokenizer: Tokenizer
    stage: str                   # pretrain | sft | grpo
    step: int
    metrics: dict[str, Any]

    @property
    def spec(self) -> ModelSpec:
        # fp32 on CPU with the plain XLA attention: what every exporter can trace
        cfg = dataclasses.replace(self.model_config, compute_dtype="float32", attention_impl="xla", remat="none")
        return ModelSpec.from_config(cfg, backend="cpu")

    @functools.cached_property
    def reference(self) -> parity.LogitsFn:
        """The JAX forward every format is compared with: one jitted function shared by all checkers."""
        return parity.jax_logits_fn(self.params, self.spec)


def _need(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise FormatUnavailable(f"{module} is not installed: pip install 'flaxchat[{extra}]'")


# ------------------------------------------------------------------------------ writers

def write_nanochat(m: ExportModel, out: str, _cfg) -> dict[str, Any]:
    from flaxchat.export.nanochat_format import write_checkpoint
    write_checkpoint(m.params, m.model_config, m.tokenizer, out, stage=m.stage, step=m.step,
                     meta={"val_bpb": m.metrics.get("val_bpb"), "exported_by": "flaxchat"})
    return {"base_dir": ".", "use": "NANOCHAT_BASE_DIR=<this folder> python -m scripts.chat_cli "
                                    f"-i {'base' if m.stage == 'pretrain' else m.stage.replace('grpo', 'rl')}"}


def write_hf(m: ExportModel, out: str, _cfg) -> dict[str, Any]:
    from safetensors.numpy import save_file

    from flaxchat.export.builtin_nanochat import builtin_blockers
    from flaxchat.export.hf_config import MODELING_FILES, hf_config_dict
    from flaxchat.export.hf_tokenizer import write_hf_tokenizer
    from flaxchat.export.layout import to_state_dict
    spec = m.spec
    save_file(to_state_dict(m.params, spec), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    specials = m.tokenizer.special_tokens
    config = hf_config_dict(spec, bos_token_id=specials["<|bos|>"], eos_token_id=specials["<|assistant_end|>"])
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": specials["<|bos|>"], "eos_token_id": specials["<|assistant_end|>"],
                   "pad_token_id": specials["<|bos|>"], "do_sample": False}, fh, indent=2)
    for path in MODELING_FILES:
        shutil.copy(path, os.path.join(out, os.path.basename(path)))
    write_hf_tokenizer(m.tokenizer, out, model_max_length=spec.sequence_len)
    blockers = builtin_blockers(m.params, spec)
    return {"load": "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)",
            "builtin_nanochat": {"loadable": not blockers, "why_not": blockers}}


def write_onnx(m: ExportModel, out: str, cfg) -> dict[str, Any]:
    _need("jax2onnx", "onnx")
    from flaxchat.export.onnx_export import export_onnx
    return export_onnx(m.params, m.spec, os.path.join(out, "model.onnx"), kv_cache=cfg.onnx_decoder)


def litert_len(m: ExportModel, cfg) -> int:
    return cfg.litert_seq_len or min(m.model_config.sequence_len, 256)


def write_litert(m: ExportModel, out: str, cfg) -> dict[str, Any]:
    _need("tensorflow", "litert")
    _need("ai_edge_litert", "litert")
    from flaxchat.export.litert_export import export_litert
    return export_litert(m.params, m.spec, os.path.join(out, "model.tflite"), seq_len=litert_len(m, cfg))


WRITERS = {"hf": write_hf, "nanochat": write_nanochat, "onnx": write_onnx, "litert": write_litert}


# ------------------------------------------------------------------------------ checkers

def _hf_logits(out: str) -> parity.LogitsFn:
    _need("torch", "hf")
    _need("transformers", "hf")
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
    return run


def _onnx_logits(out: str) -> parity.LogitsFn:
    _need("onnxruntime", "onnx")
    from flaxchat.export.onnx_export import onnx_logits_fn
    return onnx_logits_fn(os.path.join(out, "model.onnx"))


def _litert_logits(out: str) -> parity.LogitsFn:
    _need("ai_edge_litert", "litert")
    from flaxchat.export.litert_export import LiteRTModel
    model = LiteRTModel(os.path.join(out, "model.tflite"))     # batch 1: one row at a time
    return lambda ids: np.stack([model.logits(row) for row in ids])


def check_format(name: str, m: ExportModel, out: str, cfg, prompt: list[int]) -> dict[str, Any]:
    """Parity figures for one written format, or {"skipped": reason} when its runtime is missing."""
    spec = m.spec
    if name == "nanochat":
        import jax

        from flaxchat.export.nanochat_format import STAGE_DIRS, read_checkpoint, read_tokenizer
        params, _, _ = read_checkpoint(os.path.join(out, STAGE_DIRS[m.stage], f"d{m.model_config.depth}"), m.step)
        same = all(np.array_equal(a, np.asarray(b, np.float32)) for a, b in
                   zip(jax.tree.leaves(params), jax.tree.leaves(m.params)))
        tok = read_tokenizer(os.path.join(out, "tokenizer"))
        tok_same = tok.mergeable_ranks == m.tokenizer.mergeable_ranks and tok.pattern == m.tokenizer.pattern
        return {"round_trip_identical": bool(same and tok_same), "passed": bool(same and tok_same)}
    try:
        fn = {"hf": _hf_logits, "onnx": _onnx_logits, "litert": _litert_logits}[name](out)
    except FormatUnavailable as exc:
        return {"skipped": str(exc)}
    fixed = litert_len(m, cfg) if name == "litert" else None
    return parity.check(name, fn, m.reference, parity.probe_ids(spec), prompt,
                        cfg.parity_new_tokens, cfg.parity_rtol, fixed_len=fixed)
