"""nanochat's depth-scaling rules (scripts/base_train.py): horizon, batch size, LR and WD from depth.

  N        = block matrices + lm_head parameters ("scaling params")
  tokens   = int(target_param_data_ratio * N)
  D_ref    = target_param_data_ratio * N(d12)          the d12 reference model, same vocab/aspect
  B        = 2 ** round(log2(B_ref * (tokens / D_ref) ** 0.383)),  B_ref = 2**19   (Power Lines)
  lr       x sqrt(B / B_ref)                           (batch_lr_scale, every group except smear)
  wd       = weight_decay * sqrt(B / B_ref) * D_ref / tokens   (T_epoch constant)
  steps    = tokens // B
  accum    = B // (device_batch_size * sequence_len * n_devices), which must divide exactly

Param counts are computed analytically from ModelConfig (no model is built): nanochat's layout,
which is also flaxchat.model.gpt's (value embeddings and their gates only on alternating layers,
the last one always included).
"""

from __future__ import annotations

import dataclasses
import math

from flaxchat.model import flops
from flaxchat.config import ModelConfig, TrainConfig

B_REF = 2 ** 19                  # tokens per step that is optimal at d12 (nanochat, measured)
REFERENCE_DEPTH = 12
BATCH_EXPONENT = 0.383


class ScalingError(ValueError):
    """The training plan cannot be formed; the message says which knob to change."""


def _resolved(model_cfg: ModelConfig) -> ModelConfig:
    if model_cfg.vocab_size <= 0:
        raise ScalingError("model.vocab_size is 0: resolve the config first (build_config)")
    if model_cfg.n_embd:
        return model_cfg
    cfg = dataclasses.replace(model_cfg)
    cfg.derive()
    return cfg


def param_counts(model_cfg: ModelConfig) -> dict[str, int]:
    """nanochat's `num_scaling_params()` breakdown, from the config alone (flaxchat.model.flops owns the formula)."""
    return flops.param_counts(_resolved(model_cfg))


def num_scaling_params(model_cfg: ModelConfig) -> int:
    """Block matrices + lm_head: the count nanochat's scaling laws are fitted on."""
    counts = param_counts(model_cfg)
    return counts["transformer_matrices"] + counts["lm_head"]


def reference_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The d12 model nanochat tunes at: same vocab/aspect/head_dim/seq, n_kv_head = n_head."""
    ref = dataclasses.replace(model_cfg, depth=REFERENCE_DEPTH, n_kv_head=0, n_embd=0, n_head=0)
    ref.derive()
    return ref


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    num_scaling_params: int
    target_tokens: int
    reference_tokens: float          # D_ref
    total_batch_size: int            # tokens per optimizer step
    batch_lr_scale: float
    weight_decay: float              # scaled Muon weight decay
    num_steps: int
    grad_accum_steps: int
    tokens_per_micro_step: int       # device_batch_size * sequence_len * n_devices


def optimal_batch_size(target_tokens: float, reference_tokens: float) -> int:
    """B_ref * (D / D_ref)^0.383 rounded to the nearest power of two (in log space)."""
    predicted = B_REF * (target_tokens / reference_tokens) ** BATCH_EXPONENT
    return 2 ** round(math.log2(predicted))


def grad_accum_steps(total_batch_size: int, device_batch_size: int, sequence_len: int, n_devices: int) -> int:
    per_micro = device_batch_size * sequence_len * n_devices
    if per_micro <= 0:
        raise ScalingError(f"device_batch_size*sequence_len*n_devices must be positive, got {per_micro}")
    if total_batch_size % per_micro:
        raise ScalingError(
            f"total_batch_size={total_batch_size} tokens is not a multiple of device_batch_size*sequence_len*"
            f"n_devices = {device_batch_size}*{sequence_len}*{n_devices} = {per_micro}; "
            "change pretrain.device_batch_size or set pretrain.total_batch_size to a multiple")
    return total_batch_size // per_micro


def plan_training(train_cfg: TrainConfig, model_cfg: ModelConfig, n_devices: int) -> TrainingPlan:
    """Everything base_train.py derives before building the optimizer."""
    cfg = _resolved(model_cfg)
    ratio = train_cfg.target_param_data_ratio
    if train_cfg.num_steps <= 0 and ratio <= 0:
        raise ScalingError("set pretrain.num_steps > 0 or pretrain.target_param_data_ratio > 0 "
                           "(one of them defines the training horizon)")
    n_params = num_scaling_params(cfg)
    # With an explicit num_steps and no ratio, nanochat's defaults still fix B and wd via ratio 12.
    ratio = ratio if ratio > 0 else TrainConfig.target_param_data_ratio
    target_tokens = int(ratio * n_params)
    reference_tokens = ratio * num_scaling_params(reference_model_config(cfg))
    total_batch = train_cfg.total_batch_size
    if total_batch <= 0:
        total_batch = optimal_batch_size(target_tokens, reference_tokens)
    batch_ratio = total_batch / B_REF
    batch_lr_scale = batch_ratio ** 0.5 if batch_ratio != 1.0 else 1.0
    weight_decay = train_cfg.weight_decay * math.sqrt(batch_ratio) * (reference_tokens / target_tokens)
    if train_cfg.num_steps > 0:
        num_steps = train_cfg.num_steps
    else:
        num_steps = target_tokens // total_batch
        if num_steps < 1:
            raise ScalingError(f"target tokens {target_tokens} < one batch of {total_batch}: raise "
                               "pretrain.target_param_data_ratio or lower pretrain.total_batch_size")
    accum = grad_accum_steps(total_batch, train_cfg.device_batch_size, cfg.sequence_len, n_devices)
    return TrainingPlan(num_scaling_params=n_params, target_tokens=target_tokens,
                        reference_tokens=reference_tokens, total_batch_size=total_batch,
                        batch_lr_scale=batch_lr_scale, weight_decay=weight_decay, num_steps=num_steps,
                        grad_accum_steps=accum,
                        tokens_per_micro_step=train_cfg.device_batch_size * cfg.sequence_len * n_devices)
