"""Can transformers' built-in `NanoChatForCausalLM` run this model? Why not, in words.

The built-in class (transformers, since 2025-11) implements nanochat's 2025 architecture: relu²
MLP, weightless RMSNorm, QK-norm after RoPE, softcap. It has no value embeddings, sliding windows,
resid/x0 lambdas, smear or backout, it does not scale q and k by 1.2 after their norm, and its
checkpoint converter drops tensors it does not know without an error. A config that let the
built-in class load our weights would therefore give a different model silently. So we list every
difference that applies, the export manifest records the list, and the export ships our own
modeling file (`hf_modeling/`, loaded with trust_remote_code) as the one correct way to run it.

Parameters are checked where a value could make a feature vanish (a lambda of exactly 0 or 1,
all-zero value embeddings); the 1.2 q/k scale is fixed in the architecture, so it is always
listed, and with it no model of this architecture is loadable by the built-in class today.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flaxchat.model.gpt import ModelSpec

QK_SCALE_REASON = "q and k are multiplied by 1.2 after QK-norm; the built-in class does not scale them"


def builtin_blockers(params: dict[str, Any], spec: ModelSpec) -> list[str]:
    """Every reason the built-in NanoChatForCausalLM would compute a different function."""
    p = {k: np.asarray(v) if not isinstance(v, dict) else v for k, v in params.items()}
    reasons = [QK_SCALE_REASON]
    if np.any(p["value_embeds"] != 0):
        reasons.append(f"value embeddings on layers {list(spec.ve_layers)} (not modelled)")
    if any(w < spec.sequence_len for w in spec.windows):
        reasons.append(f"sliding windows {sorted(set(spec.windows))} (the built-in attends to the full context)")
    if np.any(p["resid_lambdas"] != 1) or np.any(p["x0_lambdas"] != 0):
        reasons.append("per-layer resid/x0 lambdas differ from 1/0 (not modelled)")
    if float(p["smear_lambda"]) != 0:
        reasons.append("smear (previous-token mixing) is active")
    if float(p["backout_lambda"]) != 0:
        reasons.append("backout (subtracting the mid-layer residual) is active")
    return reasons
