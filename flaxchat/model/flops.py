"""FLOPs per token (nanochat's estimate), parameter counts, and MFU against a peak bf16 table.

nanochat counts 6 FLOPs per matmul weight per token (2 forward + 4 backward) over every weight that
multiplies the token stream: all block matrices (c_q, c_k, c_v, c_proj, ve_gate, c_fc, mlp.c_proj),
lm_head (padded vocab) and smear_gate. Embedding lookups (wte, value_embeds) and per-layer scalars
are excluded. Attention adds 12 * n_head * head_dim * effective_seq per layer, where effective_seq is
min(window, T) for that layer. Softmax/norm/elementwise work is ignored (~1%).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

from flaxchat.config import ModelConfig
from flaxchat.model.gpt import SMEAR_CHANNELS, VE_GATE_CHANNELS, ModelSpec

# Dense (no sparsity) bf16 peak FLOP/s per chip, keyed by jax `device.device_kind`.
# TPU: v5e reports "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite". GPU: SXM parts unless named.
PEAK_BF16_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
}
# Fallback by substring for names not listed verbatim (checked in order: most specific first).
_FAMILY = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12)]

ModelShape = Union[ModelSpec, ModelConfig]


@dataclasses.dataclass(frozen=True)
class _Dims:
    L: int
    C: int
    H: int
    Hkv: int
    D: int
    V: int          # padded vocab (what lm_head multiplies)
    T: int
    n_ve: int
    windows: tuple[int, ...]


def _dims(m: ModelShape) -> _Dims:
    if isinstance(m, ModelConfig):
        if m.n_embd == 0:
            m = dataclasses.replace(m)
            m.derive()
        L, windows = m.depth, tuple(m.window_sizes())
        return _Dims(L, m.n_embd, m.n_head, m.n_kv_head, m.head_dim, m.padded_vocab_size, m.sequence_len,
                     sum(1 for i in range(L) if i % 2 == (L - 1) % 2), windows)
    return _Dims(m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.head_dim, m.padded_vocab_size,
                 m.sequence_len, len(m.ve_layers), m.windows)


def param_counts(m: ModelShape) -> dict[str, int]:
    """Parameter counts grouped like nanochat's num_scaling_params (same totals as nanochat)."""
    d = _dims(m)
    HD, kv = d.H * d.D, d.Hkv * d.D
    per_layer = d.C * HD + 2 * d.C * kv + HD * d.C + 8 * d.C * d.C
    counts = {
        "wte": d.V * d.C,
        "value_embeds": d.n_ve * d.V * kv,
        "lm_head": d.C * d.V,
        "transformer_matrices": d.L * per_layer + d.n_ve * VE_GATE_CHANNELS * d.Hkv,
        "scalars": 2 * d.L + SMEAR_CHANNELS + 2,
    }
    counts["total"] = sum(counts.values())
    return counts


def num_matmul_params(m: ModelShape) -> int:
    """Weights that multiply the token stream: block matrices + lm_head + smear_gate."""
    c = param_counts(m)
    return c["transformer_matrices"] + c["lm_head"] + SMEAR_CHANNELS


def estimate_flops(m: ModelShape) -> int:
    """Training FLOPs per token (forward + backward), nanochat's GPT.estimate_flops."""
    d = _dims(m)
    attn = sum(12 * d.H * d.D * min(w, d.T) for w in d.windows)
    return 6 * num_matmul_params(m) + attn


def estimate_decode_flops(m: ModelShape, context_len: int) -> int:
    """Forward FLOPs to decode one token at a given context length."""
    d = _dims(m)
    return 2 * num_matmul_params(m) + sum(4 * d.H * d.D * min(context_len, w) for w in d.windows)


def peak_bf16_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one chip, or None for an unknown kind (e.g. 'cpu')."""
    if device_kind in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[device_kind]
    for family, peak in _FAMILY:
        if family in device_kind:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, device_kind: str) -> float:
    """Model FLOPs utilisation in [0, 1]; NaN when the device's peak is unknown (e.g. CPU)."""
    peak = peak_bf16_flops(device_kind)
    if peak is None or n_devices <= 0:
        return math.nan
    return tokens_per_s * flops_per_token / (n_devices * peak)
