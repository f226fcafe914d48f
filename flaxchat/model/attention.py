"""Attention building blocks for the GPT: RMSNorm, RoPE, and causal sliding-window attention.

Semantics follow nanochat (gpt.py / flash_attention.py):
- RMSNorm has no parameters; we always compute it in fp32 with eps = fp32 machine epsilon (what
  torch's `F.rms_norm(eps=None)` uses for fp32 inputs) and return the input dtype.
- RoPE base 1e5, channels split into halves, rotated by -theta:
  y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos (nanochat's checkpoint-compatible convention).
- A window of w tokens means FA3's `window_size=(w, 0)`: query t sees keys k with
  0 <= t - k <= w (w+1 keys including itself). A window >= T is plain causal attention.

Why the window is a *traced* value: the layers run under one `lax.scan`, so the body is traced once
for every layer and the per-layer window arrives as scanned data. `jax.nn.dot_product_attention`'s
`local_window_size` must be a static Python int on the cuDNN path (it goes into the custom call's
config), so:
- "xla": the mask `causal & (q - k <= window)` is built from the traced window inside the body (the
  XLA path materialises the T x T logits anyway, so the mask costs nothing extra). Exports and
  fp32 GPU runs use it, and it really limits attention (see tests/test_model.py).
- "chunked" (what "auto" picks on CPU): flaxchat.model.chunked_attention, block-causal with its own
  backward; 2x faster than "xla" for the CPU train step. Static windows, switched like the kernels.
- "cudnn" / "splash": these kernels need static windows. A model has at most two distinct windows
  (short and long), so the body does `lax.switch(window_slot, branches)` where each branch calls
  the kernel with one static window. Both branches are compiled once, so compile time still does
  not grow with depth.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model.chunked_attention import chunked_attention

ROPE_BASE = 100_000.0
QK_SCALE = 1.2          # q and k are both multiplied by this after QK-norm (nanochat)
NORM_EPS = float(np.finfo(np.float32).eps)


class AttentionConfigError(ValueError):
    """An attention implementation was asked for where it cannot run; the message names the fix."""


def rms_norm(x: jax.Array) -> jax.Array:
    """Parameter-free RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + NORM_EPS)
    return y.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, base: float = ROPE_BASE) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for integer positions of shape (..., T) -> (..., T, 1, head_dim/2), fp32.

    A function of the positions (no 10x precomputed table as in nanochat), so decode can use a
    different position per batch row; the full-sequence forward evaluates it at trace time."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # (..., T, hd/2)
    return jnp.cos(freqs)[..., None, :], jnp.sin(freqs)[..., None, :]


def rope_table(T, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """rope_cos_sin of positions 0..T-1, evaluated once at trace time (a constant in the graph).

    Staged in the graph instead, XLA:CPU fuses cos/sin into every consumer and evaluates them again
    per head and element (12 fusions of ~7 ms each in a depth-6 train step at B=8, 2.3% of it).
    A symbolic T (shape-polymorphic export) keeps the staged ops."""
    if not isinstance(T, int):
        return rope_cos_sin(jnp.arange(T, dtype=jnp.int32), head_dim)
    with jax.ensure_compile_time_eval():
        return rope_cos_sin(jnp.arange(T, dtype=jnp.int32), head_dim)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (B, T, H, D) by -theta with halves split (nanochat's convention); math in fp32."""
    d = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :d], x32[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return jnp.concatenate([y1, y2], axis=-1)


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: jax.Array | int) -> jax.Array:
    """Boolean mask, True where query at q_pos may attend key at k_pos: causal and within window.

    q_pos (..., T) and k_pos (S,) are absolute token positions; returns (..., T, S)."""
    delta = q_pos[..., :, None] - k_pos
    return (delta >= 0) & (delta <= window)


def resolve_attention_impl(requested: str, compute_dtype: jnp.dtype, backend: str | None = None) -> str:
    """'auto' -> 'cudnn' on GPU in bf16/fp16, 'chunked' on CPU, else 'xla'. Explicit choices are checked here so a bad
    config fails at model construction, not deep inside a compile."""
    backend = backend or jax.default_backend()
    half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if requested == "auto":
        # TPU stays on xla until the splash path has been run on a TPU (see _splash_attention).
        if backend == "cpu":
            return "chunked"
        return "cudnn" if backend in ("gpu", "cuda", "rocm") and half else "xla"
    if requested == "cudnn" and (backend not in ("gpu", "cuda") or not half):
        raise AttentionConfigError(
            f"model.attention_impl=cudnn needs an NVIDIA GPU and bf16 compute (backend={backend}, "
            f"dtype={jnp.dtype(compute_dtype).name}); use attention_impl=auto or xla")
    if requested == "splash" and backend != "tpu":
        raise AttentionConfigError(
            f"model.attention_impl=splash needs a TPU (backend={backend}); use attention_impl=auto or xla")
    if requested not in ("xla", "cudnn", "splash", "chunked"):
        raise AttentionConfigError(f"model.attention_impl={requested!r} is not one of auto/xla/cudnn/splash/chunked")
    return requested


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window_slot: jax.Array,
                     windows: Sequence[int], impl: str = "xla") -> jax.Array:
    """Training/full-sequence attention. q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D).

    `windows` is the static tuple of distinct window sizes; `window_slot` (traced int32 scalar)
    picks this layer's. Scale is the default 1/sqrt(D), as in FA3/SDPA."""
    T = q.shape[1]
    windows = tuple(int(w) for w in windows)
    if impl == "xla":
        window = jnp.asarray(windows, dtype=jnp.int32)[window_slot]
        pos = jnp.arange(T, dtype=jnp.int32)
        mask = window_mask(pos, pos, window)[None, None]               # (1, 1, T, T)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if impl == "cudnn":
        kernel = _cudnn_attention
    elif impl == "splash":
        kernel = _splash_attention
    elif impl == "chunked":
        kernel = chunked_attention
    else:
        raise AttentionConfigError(f"unknown attention implementation {impl!r}; use xla, cudnn, splash or chunked")
    branches = [functools.partial(kernel, window=w) for w in windows]
    if len(branches) == 1:
        return branches[0](q, k, v)
    return jax.lax.switch(window_slot, branches, q, k, v)


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int) -> jax.Array:
    T = q.shape[1]
    local = None if window >= T else (window, 0)   # cuDNN: left window, causal, static
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                        implementation="cudnn")


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int) -> jax.Array:
    """TPU splash attention with a causal LocalMask.

    UNTESTED ON A REAL TPU. Only its interpret mode is exercised on CPU (tests/test_model.py runs it
    when the import works). Under a multi-device mesh, a Pallas kernel must be wrapped in
    shard_map over the batch axis by the caller; this function is the per-shard body."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # guarded: TPU-only module
        splash_attention_kernel as sk, splash_attention_mask as sm)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if Hkv != H:  # the MHA kernel wants one kv head per q head: repeat for GQA
        k = jnp.repeat(k, H // Hkv, axis=2)
        v = jnp.repeat(v, H // Hkv, axis=2)
    one = sm.CausalMask((T, T)) if window >= T else sm.LocalMask((T, T), (window, 0), offset=0)
    block = min(512, T)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * H), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=jax.default_backend() != "tpu")
    scale = 1.0 / np.sqrt(D)   # splash does not scale q itself
    to_heads = lambda t: jnp.swapaxes(t, 1, 2)                           # (B, H, T, D)
    out = jax.vmap(kernel)(to_heads(q * jnp.asarray(scale, q.dtype)), to_heads(k), to_heads(v))
    return jnp.swapaxes(out, 1, 2)


def _cache_scores(q: jax.Array, k_cache: jax.Array, q_pos: jax.Array, window: jax.Array | int,
                  include_own_slot: bool) -> jax.Array:
    """Masked fp32 scores (B,Hkv,G,T,S) of q (B,T,H,D) against a (B,Hkv,S,D) key cache, scaled by
    1/sqrt(D), a large finite negative where masked: causal and window by absolute position, and
    without each query's own slot unless include_own_slot (the cache before that slot's write)."""
    B, T, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(B, T, Hkv, H // Hkv, D)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(1.0 / np.sqrt(D))
    slots = jnp.arange(S, dtype=jnp.int32)
    mask = window_mask(q_pos, slots, window)
    if not include_own_slot:
        mask = mask & (slots < q_pos[..., None])
    return jnp.where(mask[:, None, None], scores, jnp.float32(-0.7 * np.finfo(np.float32).max))   # mask (B,1,1,T,S)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache_t: jax.Array, q_pos: jax.Array,
                     window: jax.Array | int) -> jax.Array:
    """Decode/prefill attention against one layer's KV cache, in flaxchat.model.kv_cache's layouts:
    q (B,T,H,D); keys (B,Hkv,S,D); values transposed, (B,Hkv,D,S); both already holding this chunk's
    entries; q_pos (B,T) absolute positions. Slots after q_pos (unwritten or stale) are excluded by
    causality, so no separate length mask is needed. -> (B,T,H,D).

    Written out rather than `jax.nn.dot_product_attention` (which wants token-major (B,S,Hkv,D)
    keys and values): both dots here contract a cache over its minor axis (D for the scores, the
    slots S for the values), the order XLA:CPU's matrix-vector products read in place; with values
    stored (B,Hkv,S,D) it copied each layer's value cache into (D,S) order every decode step. The
    math is that function's "xla" path: fp32 scores scaled by 1/sqrt(D), a large finite negative
    where masked, fp32 softmax cast to the value dtype. GQA groups the H query heads by kv head
    instead of repeating the cache."""
    B, T, H, D = q.shape
    scores = _cache_scores(q, k_cache, q_pos, window, include_own_slot=True)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache_t.dtype)
    out = jnp.einsum("bkgts,bkds->btkgd", probs, v_cache_t)
    return out.reshape(B, T, H, D)


def cached_attention_before_write(q: jax.Array, k_cache: jax.Array, v_cache_t: jax.Array, k_new: jax.Array,
                                  v_new: jax.Array, q_pos: jax.Array, window: jax.Array | int) -> jax.Array:
    """`cached_attention` for one new token per row, computed from the cache as it was BEFORE the
    token's own k/v were written, plus those k/v (B,1,Hkv,D) as one extra key. Same math: cache
    slots at or after q_pos are masked (slot q_pos still holds a stale entry), the new key is
    always visible. -> (B,1,H,D).

    Why it exists: with the write first, XLA:CPU fused the cache write into both of its consumers
    (this dot's operand and the decode loop's output) and gave each its own copy of the cache every
    step; attending first leaves the write one consumer and halves those copies (24 instead of 48
    cache-sized copies in the runcpu decode loop). The kv_cache uses it at batch 1: +5-7% decode
    tok/s on the runcpu model (interleaved pairs); with 8 rows XLA made no such copies and this form
    was ~18% slower. The value sum is accumulated in fp32 and rounded once, like the dot's."""
    B, T, H, D = q.shape
    Hkv = k_cache.shape[1]
    scale = jnp.float32(1.0 / np.sqrt(D))
    qg = q.reshape(B, T, Hkv, H // Hkv, D)
    old = _cache_scores(q, k_cache, q_pos, window, include_own_slot=False)
    new = jnp.einsum("btkgd,btkd->bkgt", qg.astype(jnp.float32), k_new.astype(jnp.float32))[..., None] * scale
    top = jnp.maximum(old.max(-1, keepdims=True), new)                                     # (B,k,g,T,1)
    p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
    total = p_old.sum(-1, keepdims=True) + p_new
    p_old, p_new = (p_old / total).astype(v_cache_t.dtype), (p_new / total).astype(v_cache_t.dtype)
    out = jnp.einsum("bkgts,bkds->btkgd", p_old, v_cache_t, preferred_element_type=jnp.float32)
    out = out + jnp.moveaxis(p_new, 3, 1).astype(jnp.float32) * v_new.astype(jnp.float32).reshape(B, T, Hkv, 1, D)
    return out.astype(v_cache_t.dtype).reshape(B, T, H, D)                                  # (B,T,k,g,D) -> (B,T,H,D)
