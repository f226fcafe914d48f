"""x @ w with a hand-written backward that never transposes the big operand (the CPU training path).

Plain autodiff of `x @ w` (x (B,T,K) activations, w (K,N) weights) asks XLA:CPU for
d(w) = x^T @ g contracted over the two leading (batch, time) axes; its dot emitter then copies the
larger operand (the MLP hidden state, 4C wide) into a transposed layout before the matmul, on every
weight gradient of every layer. Here the backward flattens (batch, time) first (a free reshape) and
transposes whichever operand is smaller:
  d(x) = g @ w^T                           (w^T: K x N, a weight, small)
  d(w) = x^T @ g         when K <= N       (x^T: K x BT, the smaller activation)
       = (g^T @ x)^T     when K >  N       (g^T: N x BT; the K x N result is small)
The forward is the same matmul as flaxchat.model.gpt._mm (operands and result in one dtype), so
values are unchanged; only the order of the backward's floating-point sums may differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) @ w (K, N) -> (..., N), operands and result in x's dtype (fp32 accumulation)."""
    return jnp.matmul(x, w, preferred_element_type=x.dtype)


def _fwd(x, w):
    return linear(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    K, N = w.shape
    x2, g2 = x.reshape(-1, K), g.reshape(-1, N)
    dx = jnp.matmul(g2, w.T, preferred_element_type=x.dtype).reshape(x.shape)
    if K <= N:
        dw = jnp.matmul(x2.T, g2, preferred_element_type=w.dtype)
    else:
        dw = jnp.matmul(g2.T, x2, preferred_element_type=w.dtype).T
    return dx, dw


linear.defvjp(_fwd, _bwd)
