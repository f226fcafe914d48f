"""KV cache and the cached forward (prefill a chunk, then decode one token at a time).

The cache is a pytree of fixed-shape arrays, so one jitted `decode` serves every step (its shapes
only change with the chunk length T; decode uses T=1):
  keys          L arrays (B, Hkv, S, D), one per layer, compute dtype, stored after RoPE + QK-norm
  values        L arrays (B, Hkv, D, S), one per layer, compute dtype: transposed, slots on the minor axis
  pos           (B,) int32              tokens already in the cache, per row (rows may differ)
  prev_embed    (B, C)                  last written token's normed, pre-smear embedding (for smear)

`decode(params, spec, cache, idx)` writes the chunk's k/v at positions pos..pos+T-1 of each row and
attends over the cache with a causal+window mask built from absolute positions, so it equals the
full forward pass (tests/test_decode.py). Unlike nanochat's engine, a chunk that starts at pos > 0
also smears its first token with the cached previous embedding, so chunked prefill is exact.
Writes past max_len are dropped, and the logits of such positions are meaningless: the speculative
engine's k+1-token forwards may overrun near max_len and use only the positions inside. Each step
attends over all S slots (masked), so its cost is O(S): the engine sizes S to the request
(flaxchat.inference.engine, cache buckets), not to the model's sequence_len.

Why this layout (measured on CPU, depth 6 / n_embd 384, tests/test_engine_buckets.py checks the
shapes): the layers are unrolled (a Python loop, traced once) over per-layer weights and per-layer
cache buffers. A layer `lax.scan` over one stacked (L, B, S, Hkv, D) cache and stacked weights made
every step copy each layer's weights (a dynamic slice of the stack; ~40% of the weight bytes again
per token) and each layer's K/V into the (B, Hkv, ., .) order the attention dot wants. Here each
layer's K/V is its own buffer already in the order its attention dot contracts (values with the slot
axis last: stored (B, Hkv, S, D), XLA transposed each layer's values every step): the new token is
scattered into it in place (jit with `donate_argnums`, see `jit_decode`) and the dots read it as is.
`prepare_params` splits the stacked block weights once, outside a decode loop; `decode` also takes
plain params (it then slices the stack itself: fine for one call, a copy per step inside a loop).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flaxchat.model.attention import cached_attention, cached_attention_before_write, rope_table
from flaxchat.model.gpt import (ModelSpec, block_out, block_qkv, embed_tokens, head_raw, layer_inputs,
                                logits_at_positions, smear, softcap_logits, value_rows)


class KVCache(NamedTuple):
    keys: tuple[jax.Array, ...]      # per layer (B, Hkv, S, D)
    values: tuple[jax.Array, ...]    # per layer (B, Hkv, D, S)
    pos: jax.Array
    prev_embed: jax.Array

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def k(self) -> jax.Array:
        """All keys stacked token-major, (L, B, S, Hkv, D): the layout of the ONNX decoder's k_cache.
        A copy, for checks and export, never for a decode loop."""
        return jnp.stack([jnp.swapaxes(k, 1, 2) for k in self.keys])

    @property
    def v(self) -> jax.Array:
        """All values stacked token-major, (L, B, S, Hkv, D) (a copy, like `k`)."""
        return jnp.stack([jnp.transpose(v, (0, 3, 1, 2)) for v in self.values])


def init_cache(spec: ModelSpec, batch_size: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens."""
    dtype = dtype or spec.dtype
    k_shape = (batch_size, spec.n_kv_head, max_len, spec.head_dim)
    v_shape = (batch_size, spec.n_kv_head, spec.head_dim, max_len)
    return KVCache(keys=tuple(jnp.zeros(k_shape, dtype) for _ in range(spec.n_layer)),
                   values=tuple(jnp.zeros(v_shape, dtype) for _ in range(spec.n_layer)),
                   pos=jnp.zeros((batch_size,), jnp.int32),
                   prev_embed=jnp.zeros((batch_size, spec.n_embd), spec.dtype))


def prepare_params(params: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """params with the stacked block weights replaced by `layers`: one dict per layer (the slices of
    `layer_inputs`). Do it once before a loop of `decode` calls (see the module docstring)."""
    stacked = layer_inputs(params, spec)
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(spec.n_layer))
    return {**{k: v for k, v in params.items() if k != "blocks"}, "layers": layers}


def decode(params: dict, spec: ModelSpec, cache: KVCache, idx: jax.Array,
           logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Run idx (B,T) through the model after what the cache holds. -> (logits (B,T,vocab) fp32, cache).
    params: the model's param tree, or `prepare_params` of it. logits_at (B,) int32: only position
    logits_at[b] of row b gets logits, -> (B,vocab): a prefill needs just each prompt's last token's,
    and the head over all B*T positions was its largest matmul and a (B,T,vocab) fp32 buffer."""
    s = spec
    B, T = idx.shape
    layers = params["layers"] if "layers" in params else prepare_params(params, s)["layers"]
    positions = cache.pos[:, None] + jnp.arange(T, dtype=jnp.int32)[None]      # (B,T)
    x_emb = embed_tokens(params, s, idx)
    prev = jnp.concatenate([cache.prev_embed[:, None].astype(x_emb.dtype), x_emb[:, :-1]], axis=1)
    x0 = smear(params, s, x_emb, prev, positions > 0)
    # rows of a table of every slot's angles, a constant: computed from the positions in the step,
    # XLA:CPU fused cos/sin into each q/k rotation and evaluated them again per head and element
    # (24 fusions of ~10 us per step with 8 rows); +2% tok/s at batch 1, +3.5% with 8 rows.
    # Positions past the cache (a speculative overrun) clamp; their logits are unused anyway.
    cos_t, sin_t = rope_table(cache.max_len, s.head_dim)                       # (S,1,D/2)
    cos, sin = cos_t[positions], sin_t[positions]                              # (B,T,1,D/2)
    rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))

    x, x_mid = x0, jnp.zeros_like(x0)
    keys, values = list(cache.keys), list(cache.values)
    for i, layer in enumerate(layers):            # unrolled at trace time (why: module docstring)
        x, q, k, v = block_qkv(s, layer, x, x0, value_rows(params, layer, idx), cos, sin)
        if B * T == 1:    # attend before the write, which then has one consumer (why: the function's docstring)
            y = cached_attention_before_write(q, keys[i].astype(q.dtype), values[i].astype(q.dtype), k, v,
                                              positions, s.windows[i])
        # [rows, :, positions] and [rows, :, :, positions] put the (B,T) index dims first: each update
        # is k's / v's own (B,T,Hkv,D)
        keys[i] = keys[i].at[rows, :, positions].set(k.astype(keys[i].dtype), mode="drop")
        values[i] = values[i].at[rows, :, :, positions].set(v.astype(values[i].dtype), mode="drop")
        if B * T > 1:
            y = cached_attention(q, keys[i].astype(q.dtype), values[i].astype(q.dtype), positions, s.windows[i])
        x = block_out(s, layer, x, y)
        if i == s.backout_layer:
            x_mid = x
    if logits_at is None:
        logits = softcap_logits(head_raw(params, s, x, x_mid), s)
    else:
        logits = logits_at_positions(params, s, x, x_mid, logits_at)
    return logits, KVCache(keys=tuple(keys), values=tuple(values), pos=cache.pos + T, prev_embed=x_emb[:, -1])


def jit_decode(spec: ModelSpec):
    """decode jitted for `spec`, donating the cache buffers: fn(params, cache, idx) -> (logits, cache)."""
    return jax.jit(lambda params, cache, idx: decode(params, spec, cache, idx), donate_argnums=(1,))
