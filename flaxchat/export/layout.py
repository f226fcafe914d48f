"""Our parameter tree <-> nanochat's state dict: names, layouts and model config, in NumPy.

Every export format that is read by torch code (nanochat's checkpoint, the Hugging Face export)
uses nanochat's own parameter names and torch's (out, in) Linear layout, so one mapping serves both
and a tensor can be traced from a nanochat checkpoint to our tree and back by name:

  ours (Flax kernels are (in, out); blocks stacked on a leading layer axis)   nanochat (torch)
  wte (Vp, C)                                 transformer.wte.weight (Vp, C)
  lm_head (C, Vp)                             lm_head.weight (Vp, C)
  blocks.attn.c_q[i] (C, H*D)                 transformer.h.{i}.attn.c_q.weight (H*D, C)   (c_k, c_v, c_proj alike)
  blocks.attn.ve_gate[j] (12, Hkv)            transformer.h.{layer j}.attn.ve_gate.weight (Hkv, 12)
  blocks.mlp.c_fc[i] (C, 4C)                  transformer.h.{i}.mlp.c_fc.weight (4C, C)     (c_proj alike)
  value_embeds[j] (Vp, kv)                    value_embeds.{layer j}.weight (Vp, kv)
  resid_lambdas, x0_lambdas (L,)              resid_lambdas, x0_lambdas (L,)
  smear_gate (24, 1)                          smear_gate.weight (1, 24)
  smear_lambda, backout_lambda ()             smear_lambda, backout_lambda (1,)
where j indexes the value-embedding layers (alternating, the last always included).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flaxchat.config import ModelConfig
from flaxchat.model.gpt import ModelSpec

# nanochat's checkpoints of torch.compile'd models prefix every key with this
COMPILE_PREFIX = "_orig_mod."


class LayoutError(ValueError):
    """A state dict or config that does not describe the model it claims to; the message says which key."""


def _ve_layers(n_layer: int) -> list[int]:
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


def to_state_dict(params: dict[str, Any], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Our nested param tree (GPT.param_tree()) -> nanochat's flat state dict of fp32 arrays."""
    p = {k: v for k, v in params.items()}
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))   # noqa: E731
    out: dict[str, np.ndarray] = {
        "transformer.wte.weight": f32(p["wte"]),
        "lm_head.weight": f32(np.asarray(p["lm_head"]).T),
        "resid_lambdas": f32(p["resid_lambdas"]),
        "x0_lambdas": f32(p["x0_lambdas"]),
        "smear_gate.weight": f32(np.asarray(p["smear_gate"]).T),
        "smear_lambda": f32(p["smear_lambda"]).reshape(1),
        "backout_lambda": f32(p["backout_lambda"]).reshape(1),
    }
    blocks = p["blocks"]
    for i in range(spec.n_layer):
        for group, names in (("attn", ("c_q", "c_k", "c_v", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
            for name in names:
                out[f"transformer.h.{i}.{group}.{name}.weight"] = f32(np.asarray(blocks[group][name][i]).T)
    for j, layer in enumerate(spec.ve_layers):
        out[f"transformer.h.{layer}.attn.ve_gate.weight"] = f32(np.asarray(blocks["attn"]["ve_gate"][j]).T)
        out[f"value_embeds.{layer}.weight"] = f32(p["value_embeds"][j])
    return out


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every key of nanochat's state dict for this shape, with its torch shape."""
    C, Vp, HD, kv, Hkv = spec.n_embd, spec.padded_vocab_size, spec.n_head * spec.head_dim, spec.kv_dim, spec.n_kv_head
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (Vp, C), "lm_head.weight": (Vp, C),
        "resid_lambdas": (spec.n_layer,), "x0_lambdas": (spec.n_layer,),
        "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,),
    }
    for i in range(spec.n_layer):
        shapes.update({f"transformer.h.{i}.attn.c_q.weight": (HD, C), f"transformer.h.{i}.attn.c_k.weight": (kv, C),
                       f"transformer.h.{i}.attn.c_v.weight": (kv, C), f"transformer.h.{i}.attn.c_proj.weight": (C, HD),
                       f"transformer.h.{i}.mlp.c_fc.weight": (4 * C, C), f"transformer.h.{i}.mlp.c_proj.weight": (C, 4 * C)})
    for layer in spec.ve_layers:
        shapes[f"transformer.h.{layer}.attn.ve_gate.weight"] = (Hkv, 12)
        shapes[f"value_embeds.{layer}.weight"] = (Vp, kv)
    return shapes


def check_state_dict(state: dict[str, np.ndarray], spec: ModelSpec, source: str) -> None:
    """Every expected key present with its shape, nothing unknown: a silently dropped or
    misplaced tensor would give a wrong model without an error."""
    want = expected_shapes(spec)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise LayoutError(f"{source}: state dict does not match a depth-{spec.n_layer} n_embd-{spec.n_embd} model "
                          f"(missing {missing[:4]}{'…' if len(missing) > 4 else ''}, unexpected "
                          f"{extra[:4]}{'…' if len(extra) > 4 else ''}); check the checkpoint's model config")
    for key, shape in want.items():
        if tuple(state[key].shape) != shape:
            raise LayoutError(f"{source}: {key} has shape {tuple(state[key].shape)}, the model config implies "
                              f"{shape}; the checkpoint's depth/width disagree with its config")


def from_state_dict(state: dict[str, np.ndarray], spec: ModelSpec, source: str = "state dict") -> dict[str, Any]:
    """nanochat's state dict (any float dtype, `_orig_mod.` prefixes allowed) -> our param tree, fp32."""
    state = {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}
    check_state_dict(state, spec, source)
    f32 = lambda k: np.asarray(state[k], dtype=np.float32)   # noqa: E731
    layers = range(spec.n_layer)
    stack = lambda fmt: np.stack([f32(fmt.format(i)).T for i in layers])   # noqa: E731
    return {
        "wte": f32("transformer.wte.weight"),
        "lm_head": np.ascontiguousarray(f32("lm_head.weight").T),
        "blocks": {
            "attn": {name: stack(f"transformer.h.{{}}.attn.{name}.weight") for name in ("c_q", "c_k", "c_v", "c_proj")}
            | {"ve_gate": np.stack([f32(f"transformer.h.{i}.attn.ve_gate.weight").T for i in spec.ve_layers])},
            "mlp": {name: stack(f"transformer.h.{{}}.mlp.{name}.weight") for name in ("c_fc", "c_proj")},
        },
        "value_embeds": np.stack([f32(f"value_embeds.{i}.weight") for i in spec.ve_layers]),
        "resid_lambdas": f32("resid_lambdas"),
        "x0_lambdas": f32("x0_lambdas"),
        "smear_gate": np.ascontiguousarray(f32("smear_gate.weight").T),
        "smear_lambda": f32("smear_lambda").reshape(()),
        "backout_lambda": f32("backout_lambda").reshape(()),
    }


def nanochat_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """Our resolved ModelConfig -> nanochat's GPTConfig kwargs (meta JSON `model_config`)."""
    return {"sequence_len": cfg.sequence_len, "vocab_size": cfg.vocab_size, "n_layer": cfg.depth,
            "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "n_embd": cfg.n_embd,
            "window_pattern": cfg.window_pattern}


def model_config_from_nanochat(kwargs: dict[str, Any], source: str = "meta") -> ModelConfig:
    """nanochat's GPTConfig kwargs -> our ModelConfig (resolved), or a LayoutError naming the field.

    Our config derives n_embd = ceil(depth * aspect_ratio / head_dim) * head_dim; nanochat stores
    n_embd and n_head, so we pick head_dim = n_embd / n_head and an aspect ratio reproducing n_embd."""
    try:
        n_layer, n_head, n_embd = int(kwargs["n_layer"]), int(kwargs["n_head"]), int(kwargs["n_embd"])
        vocab, seq = int(kwargs["vocab_size"]), int(kwargs["sequence_len"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LayoutError(f"{source}: model_config lacks a valid {exc}; nanochat's meta JSON needs sequence_len, "
                          f"vocab_size, n_layer, n_head, n_kv_head, n_embd") from exc
    if n_layer < 1 or n_head < 1 or n_embd % n_head:
        raise LayoutError(f"{source}: n_embd={n_embd} is not a multiple of n_head={n_head} (n_layer={n_layer})")
    head_dim = n_embd // n_head
    ratio = next((r for r in (n_embd // n_layer, math.ceil(n_embd / n_layer))
                  if r > 0 and math.ceil(n_layer * r / head_dim) * head_dim == n_embd), None)
    if ratio is None:
        raise LayoutError(f"{source}: n_embd={n_embd} with n_layer={n_layer}, head_dim={head_dim} cannot be "
                          f"expressed as depth x aspect_ratio rounded to head_dim")
    cfg = ModelConfig(depth=n_layer, aspect_ratio=ratio, head_dim=head_dim,
                      n_kv_head=int(kwargs.get("n_kv_head", n_head)), sequence_len=seq, vocab_size=vocab,
                      window_pattern=str(kwargs.get("window_pattern", "L")))   # old checkpoints: full context
    cfg.derive()
    return cfg
