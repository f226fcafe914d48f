"""KV cache and the cached forward (prefill a chunk, then decode one token at a time).

The cache is a pytree of fixed-shape arrays, so one jitted `decode` serves every step (its shapes
only change with the chunk length T; decode uses T=1):
  k, v        (L, B, max_len, Hkv, D)  compute dtype; keys are stored after RoPE + QK-norm
  pos         (B,) int32              tokens already in the cache, per row (rows may differ)
  prev_embed  (B, C)                  last written token's normed, pre-smear embedding (for smear)

`decode(params, spec, cache, idx)` writes the chunk's k/v at positions pos..pos+T-1 of each row and
attends over the whole cache with a causal+window mask built from absolute positions, so it equals
the full forward pass (tests/test_decode.py). Unlike nanochat's engine, a chunk that starts at
pos > 0 also smears its first token with the cached previous embedding, so chunked prefill is exact.
Writes past max_len are dropped, and the logits of such positions are meaningless: the speculative
engine's k+1-token forwards may overrun near max_len and use only the positions inside. Each step attends
over all max_len slots (masked), so its cost is O(max_len) whatever the window: fine at chat lengths.

The per-layer cache slices are carried through the layer scan and updated with an in-place scatter;
jit with `donate_argnums` on the cache (see `jit_decode`) so XLA reuses its buffers step to step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flaxchat.model.attention import cached_attention, rope_cos_sin
from flaxchat.model.gpt import (ModelSpec, block_out, block_qkv, embed_tokens, head_raw, layer_inputs, smear,
                            softcap_logits, value_rows)


class KVCache(NamedTuple):
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    prev_embed: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(spec: ModelSpec, batch_size: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens."""
    dtype = dtype or spec.dtype
    shape = (spec.n_layer, batch_size, max_len, spec.n_kv_head, spec.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pos=jnp.zeros((batch_size,), jnp.int32),
                   prev_embed=jnp.zeros((batch_size, spec.n_embd), spec.dtype))


def decode(params: dict, spec: ModelSpec, cache: KVCache, idx: jax.Array,
           unroll: int | bool = 1) -> tuple[jax.Array, KVCache]:
    """Run idx (B,T) through the model after what the cache holds. -> (logits (B,T,vocab) fp32, cache).
    `unroll` is the layer scan's: True for a small model stepped many times inside another loop (the
    speculative draft), where a loop per forward costs more than its layers."""
    s = spec
    B, T = idx.shape
    positions = cache.pos[:, None] + jnp.arange(T, dtype=jnp.int32)[None]      # (B,T)
    x_emb = embed_tokens(params, s, idx)
    prev = jnp.concatenate([cache.prev_embed[:, None].astype(x_emb.dtype), x_emb[:, :-1]], axis=1)
    x0 = smear(params, s, x_emb, prev, positions > 0)
    cos, sin = rope_cos_sin(positions, s.head_dim)                             # (B,T,1,D/2)
    rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))

    def body(carry, layer):
        x, x_mid, k_all, v_all = carry
        x, q, k, v = block_qkv(s, layer, x, x0, value_rows(params, layer, idx), cos, sin)
        lid = layer["layer_id"]
        k_all = k_all.at[lid, rows, positions].set(k.astype(k_all.dtype), mode="drop")
        v_all = v_all.at[lid, rows, positions].set(v.astype(v_all.dtype), mode="drop")
        k_l = jax.lax.dynamic_index_in_dim(k_all, lid, 0, keepdims=False).astype(q.dtype)
        v_l = jax.lax.dynamic_index_in_dim(v_all, lid, 0, keepdims=False).astype(q.dtype)
        y = cached_attention(q, k_l, v_l, positions, layer["window"])
        x = block_out(s, layer, x, y)
        x_mid = jnp.where(lid == s.backout_layer, x, x_mid)
        return (x, x_mid, k_all, v_all), None

    init = (x0, jnp.zeros_like(x0), cache.k, cache.v)
    (x, x_mid, k_all, v_all), _ = jax.lax.scan(body, init, layer_inputs(params, s), unroll=unroll)
    logits = softcap_logits(head_raw(params, s, x, x_mid), s)
    return logits, KVCache(k=k_all, v=v_all, pos=cache.pos + T, prev_embed=x_emb[:, -1])


def jit_decode(spec: ModelSpec, unroll: int | bool = 1):
    """decode jitted for `spec`, donating the cache buffers: fn(params, cache, idx) -> (logits, cache)."""
    return jax.jit(lambda params, cache, idx: decode(params, spec, cache, idx, unroll), donate_argnums=(1,))
