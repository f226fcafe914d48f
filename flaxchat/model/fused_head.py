"""The fused LM head + softcap + cross-entropy: logits are made chunk by chunk and never stored.

nanochat computes `logits = 15*tanh((h @ lm_head)[:vocab] / 15)` in fp32 and then cross-entropy.
Done by plain autodiff that keeps a (B,T,V) tensor alive between forward and backward (512 MiB at
B=8, T=512, V=32768 in fp32) and, on XLA:CPU, makes the logits gradient twice: once transposed for
the weight gradient and once again for the input gradient. Here the head works on chunks of the
sequence (a `lax.scan`), each chunk makes its logits, their loss and their gradient once, and only
O(B*T) statistics or the small gradients leave a chunk:

- `head_loss` (reductions 'mean'/'sum', the training loss): the loss is a weighted sum
  sum_i w_i * nll_i with weights that do not depend on the parameters, so the gradient of the loss
  is known up to the scalar cotangent g. The forward pass computes d(h) (B,T,C) and d(W) (C,V) along
  with the loss (3 matmuls, the minimum), the backward pass only scales them by g.
- `head_nll` (reduction 'none', per-token losses for GRPO and eval): the cotangent is per token, so
  the forward keeps only the log-sum-exp (B,T) and the backward recomputes each chunk's logits
  (4 matmuls instead of 3, but no (B,T,V) residual).
- `head_nll_argmax` (forward only, CORE eval): per-token nll and the greedy prediction per position.

Numerics are those of the unfused path: the matmul runs in the compute dtype and returns it (like
nanochat's Linear); softcap, softmax and loss are fp32; columns >= vocab_size (padding) are masked;
targets == -1 are ignored. Because the softcap bounds |z| <= softcap, the log-sum-exp needs no max
shift (exp(15) * V is far from fp32 overflow).
Both ops take the matmul's layouts so that no big operand is transposed: d(h) = U @ W^T with W^T
made once (C x V, small next to U), d(W) = h_c^T @ U with the chunk's h transposed (small).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxchat.mesh import with_logical_constraint   # no-op outside flaxchat.mesh.mesh_context

IGNORE_INDEX = -1
CHUNK_ROWS = 1024        # rows (batch * chunk length) per chunk: (1024, 32768) fp32 logits = 128 MiB


def chunk_len(batch: int, seq: int, rows: int = CHUNK_ROWS) -> int:
    """The sequence chunk length: the largest divisor of seq with batch * len <= rows (at least 1)."""
    want = max(1, rows // max(batch, 1))
    return max(d for d in range(1, seq + 1) if seq % d == 0 and d <= want) if want < seq else seq


def _chunks(a: jax.Array, c: int) -> jax.Array:
    """(B,T,...) -> (T/c, B, c, ...): the scan axis first, batch kept as the (sharded) second axis."""
    B, T = a.shape[:2]
    return jnp.moveaxis(a.reshape(B, T // c, c, *a.shape[2:]), 1, 0)


def _unchunks(a: jax.Array) -> jax.Array:
    n, B, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape(B, n * c, *a.shape[3:])


def _logits(h: jax.Array, w: jax.Array, tgt: jax.Array, softcap: float, vocab: int):
    """One chunk's softcapped logits and their statistics. h (B,c,C), w (C,Vp) compute dtype.
    Returns t = tanh(raw/softcap) (B,c,Vp) fp32, lse (B,c), nll (B,c) (0 where ignored), cols."""
    raw = jnp.matmul(h, w, preferred_element_type=h.dtype)
    raw = with_logical_constraint(raw, ("batch", "seq", "vocab"))
    t = jnp.tanh(raw.astype(jnp.float32) / softcap)
    cols = jax.lax.broadcasted_iota(jnp.int32, t.shape, t.ndim - 1)
    e = jnp.exp(softcap * t)
    if vocab < t.shape[-1]:      # static: with no padded columns the mask pass is skipped (a full pass per chunk)
        e = jnp.where(cols < vocab, e, 0.0)
    lse = jnp.log(e.sum(-1))
    valid = tgt != IGNORE_INDEX
    picked = softcap * jnp.take_along_axis(t, jnp.where(valid, tgt, 0)[..., None], axis=-1)[..., 0]
    return t, e, lse, jnp.where(valid, lse - picked, 0.0), cols


def _dlogits(t, e, lse, tgt, coef, cols, dtype):
    """d(loss)/d(raw) for one chunk with per-token cotangent coef (B,c): coef * (softmax - onehot)
    * (1 - t^2), in the compute dtype for the matmuls. Zero in ignored rows, and in padded columns
    because e is 0 there and no target points past the vocab."""
    coef = jnp.where(tgt != IGNORE_INDEX, coef, 0.0)[..., None]
    d = coef * (e * jnp.exp(-lse)[..., None] - (cols == tgt[..., None])) * (1.0 - t * t)
    return d.astype(dtype)


def _grads(h, w_t, d):
    """(d h (B,c,C), d W (C,Vp) fp32) of one chunk from d(raw) (B,c,Vp): big operand never transposed."""
    B, c, C = h.shape
    dh = jnp.matmul(d, w_t, preferred_element_type=h.dtype)
    h_t = h.reshape(B * c, C).T                                    # small transpose: (C, B*c)
    dw = jnp.matmul(h_t, d.reshape(B * c, -1), preferred_element_type=jnp.float32)
    return dh, dw


# ------------------------------------------------------------------ 'mean' / 'sum': grads in the forward
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def head_loss(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
              softcap: float, vocab: int, chunk: int) -> jax.Array:
    """sum_i weights_i * nll_i (a scalar) of the softcapped logits h @ w. h (B,T,C) and w (C,Vp) in
    the compute dtype, targets (B,T) int (-1 ignored), weights (B,T) fp32 (not differentiated)."""
    def body(total, xs):
        hc, tc, wc = xs
        _, _, _, nll, _ = _logits(hc, w, tc, softcap, vocab)
        return total + (wc * nll).sum(), None
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (_chunks(h, chunk), _chunks(targets, chunk), _chunks(weights, chunk)))
    return total


def _head_loss_fwd(h, w, targets, weights, softcap, vocab, chunk):
    w_t = w.T

    def body(carry, xs):
        total, dw = carry
        hc, tc, wc = xs
        t, e, lse, nll, cols = _logits(hc, w, tc, softcap, vocab)
        dh, dwc = _grads(hc, w_t, _dlogits(t, e, lse, tc, wc, cols, h.dtype))
        return (total + (wc * nll).sum(), dw + dwc), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, (_chunks(h, chunk), _chunks(targets, chunk), _chunks(weights, chunk)))
    return total, (_unchunks(dh), dw.astype(w.dtype))


def _head_loss_bwd(softcap, vocab, chunk, res, g):
    dh, dw = res
    return (g * dh.astype(jnp.float32)).astype(dh.dtype), (g * dw.astype(jnp.float32)).astype(dw.dtype), None, None


head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


# ------------------------------------------------------------------ 'none': per-token, recompute in the backward
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def head_nll(h: jax.Array, w: jax.Array, targets: jax.Array, softcap: float, vocab: int, chunk: int) -> jax.Array:
    """Per-token nll (B,T) fp32 of the softcapped logits h @ w, 0 where targets == -1."""
    return _head_nll_fwd(h, w, targets, softcap, vocab, chunk)[0]


def _head_nll_fwd(h, w, targets, softcap, vocab, chunk):
    def body(_, xs):
        hc, tc = xs
        _, _, lse, nll, _ = _logits(hc, w, tc, softcap, vocab)
        return None, (nll, lse)
    _, (nll, lse) = jax.lax.scan(body, None, (_chunks(h, chunk), _chunks(targets, chunk)))
    return _unchunks(nll), (h, w, targets, _unchunks(lse))


def _head_nll_bwd(softcap, vocab, chunk, res, g):
    h, w, targets, lse = res
    w_t = w.T

    def body(dw, xs):
        hc, tc, lc, gc = xs
        t, e, _, _, cols = _logits(hc, w, tc, softcap, vocab)
        dh, dwc = _grads(hc, w_t, _dlogits(t, e, lc, tc, gc, cols, h.dtype))
        return dw + dwc, dh

    xs = tuple(_chunks(a, chunk) for a in (h, targets, lse, g))
    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    return _unchunks(dh), dw.astype(w.dtype), None


head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)


# ------------------------------------------------------------------ forward only: nll and argmax (CORE eval)
def head_nll_argmax(h: jax.Array, w: jax.Array, targets: jax.Array, softcap: float, vocab: int,
                    chunk: int) -> tuple[jax.Array, jax.Array]:
    """(per-token nll (B,T) fp32, 0 where targets == -1; argmax (B,T) int32 over the vocab) of the
    softcapped logits h @ w, chunk by chunk (tanh is monotonic, so the argmax of t is the logits')."""
    def body(_, xs):
        hc, tc = xs
        t, _, _, nll, cols = _logits(hc, w, tc, softcap, vocab)
        if vocab < t.shape[-1]:
            t = jnp.where(cols < vocab, t, -jnp.inf)
        return None, (nll, jnp.argmax(t, axis=-1).astype(jnp.int32))
    _, (nll, top) = jax.lax.scan(body, None, (_chunks(h, chunk), _chunks(targets, chunk)))
    return _unchunks(nll), _unchunks(top)
