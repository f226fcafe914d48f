"""Block-causal attention with its own backward: the CPU training path ("chunked" attention_impl).

`jax.nn.dot_product_attention(implementation="xla")` with a mask computes all T x T scores, keeps the
(B,H,T,T) probabilities for the backward pass (a stacked buffer of them per layer under the layer
scan) and copies them transposed there. This one:
- splits the queries into a few blocks and gives block i only the keys it can see: causal means
  nothing right of the block, a window w means nothing left of (block start - w), rounded to blocks.
  At T=512 with 4 blocks, full causal attention computes 10/16 of the score matrix; a short window
  even less. The mask is a static (numpy) constant per block.
- keeps only q, k, v, the output and the row log-sum-exp (B,H,T) for the backward, which recomputes
  each block's probabilities directly in the transposed (key, query) layout that the key/value
  gradients contract over, so no probability matrix is ever transposed:
    P^T = exp(K Q^T * scale - lse)      dV = P^T dO       dP^T = V dO^T
    dS^T = P^T * (dP^T - rowsum(dO*O))  dK = dS^T Q * scale   dQ = (K^T dS^T)^T * scale
Semantics are those of flaxchat.model.attention.causal_attention: query t sees keys t-w..t (FA3
window (w, 0)); scale 1/sqrt(D); GQA by repeating the kv heads. The window is static (the caller
switches over the model's few distinct windows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MIN_BLOCK = 64          # smaller query blocks make matmuls too thin to pay for the skipped work
MAX_BLOCKS = 4


def num_blocks(T: int) -> int:
    """Query blocks for length T: the most (<= MAX_BLOCKS, a divisor of T) that are >= MIN_BLOCK long."""
    return next(n for n in range(MAX_BLOCKS, 0, -1) if T % n == 0 and (T // n >= MIN_BLOCK or n == 1))


def _plan(T: int, window: int) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Static per-block (q_lo, q_hi, k_lo, k_hi, mask (q, k)): the key range each query block sees."""
    c = T // num_blocks(T)
    out = []
    for q_lo in range(0, T, c):
        q_hi = q_lo + c
        k_lo = max(0, (q_lo - window) // c * c)
        delta = np.arange(q_lo, q_hi)[:, None] - np.arange(k_lo, q_hi)[None, :]
        out.append((q_lo, q_hi, k_lo, q_hi, (delta >= 0) & (delta <= window)))
    return out


def _scores_t(k, q, scale):
    """(B,H,Lk,D), (B,H,Lq,D) -> scale * K Q^T (B,H,Lk,Lq) in fp32."""
    return scale * jnp.einsum("bhkd,bhqd->bhkq", k, q, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, window: int) -> jax.Array:
    """Head-major q, k, v (B,H,T,D) -> output (B,H,T,D)."""
    return _attend_fwd(q, k, v, window)[0]


def _attend_fwd(q, k, v, window):
    T, D = q.shape[2], q.shape[3]
    scale = 1.0 / np.sqrt(D)
    outs, lses = [], []
    for q_lo, q_hi, k_lo, k_hi, mask in _plan(T, window):
        s = scale * jnp.einsum("bhqd,bhkd->bhqk", q[:, :, q_lo:q_hi], k[:, :, k_lo:k_hi],
                               preferred_element_type=jnp.float32)
        s = jnp.where(mask, s, -jnp.inf)
        m = s.max(-1, keepdims=True)                      # finite: every query sees itself
        p = jnp.exp(s - m)
        l = p.sum(-1, keepdims=True)
        o = jnp.einsum("bhqk,bhkd->bhqd", (p / l).astype(v.dtype), v[:, :, k_lo:k_hi],
                       preferred_element_type=jnp.float32)
        outs.append(o.astype(q.dtype))
        lses.append((m + jnp.log(l))[..., 0])
    out = jnp.concatenate(outs, axis=2)
    return out, (q, k, v, out, jnp.concatenate(lses, axis=2))


def _attend_bwd(window, res, do):
    q, k, v, out, lse = res
    T, D = q.shape[2], q.shape[3]
    scale = 1.0 / np.sqrt(D)
    delta = jnp.einsum("bhqd,bhqd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for q_lo, q_hi, k_lo, k_hi, mask in _plan(T, window):
        qb, dob, kb, vb = q[:, :, q_lo:q_hi], do[:, :, q_lo:q_hi], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi]
        p_t = jnp.where(mask.T, jnp.exp(_scores_t(kb, qb, scale) - lse[:, :, None, q_lo:q_hi]), 0.0)
        dv = dv.at[:, :, k_lo:k_hi].add(jnp.einsum("bhkq,bhqd->bhkd", p_t.astype(v.dtype), dob,
                                                   preferred_element_type=jnp.float32))
        dp_t = jnp.einsum("bhkd,bhqd->bhkq", vb, dob, preferred_element_type=jnp.float32)
        ds_t = (p_t * (dp_t - delta[:, :, None, q_lo:q_hi]) * scale).astype(q.dtype)
        dk = dk.at[:, :, k_lo:k_hi].add(jnp.einsum("bhkq,bhqd->bhkd", ds_t, qb, preferred_element_type=jnp.float32))
        dq_t = jnp.einsum("bhkd,bhkq->bhdq", kb, ds_t, preferred_element_type=jnp.float32)
        dq_blocks.append(jnp.swapaxes(dq_t, 2, 3))
    dq = jnp.concatenate(dq_blocks, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attend.defvjp(_attend_fwd, _attend_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int) -> jax.Array:
    """q (B,T,H,D), k/v (B,T,Hkv,D), static window (>= T: plain causal) -> (B,T,H,D)."""
    H, Hkv = q.shape[2], k.shape[2]
    if Hkv != H:
        k, v = jnp.repeat(k, H // Hkv, axis=2), jnp.repeat(v, H // Hkv, axis=2)
    heads = lambda t: jnp.swapaxes(t, 1, 2)
    return heads(_attend(heads(q), heads(k), heads(v), int(window)))
