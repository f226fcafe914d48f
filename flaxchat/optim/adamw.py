"""nanochat's fused AdamW step for one parameter, as a pure function returning an optax update.

Why not `optax.adamw`: the math is the same family, but nanochat's exact form is
    p   <- p * (1 - lr*wd)                       decoupled decay, on the *pre-step* param
    m   <- lerp(m, g, 1-b1);  v <- lerp(v, g^2, 1-b2)
    p   <- p - (lr / (1 - b1^t)) * m / (sqrt(v / (1 - b2^t)) + eps)
with eps = 1e-10 added *after* the bias-corrected sqrt, t the 1-based step, all math in fp32
and the state stored in the parameter's dtype. Folding that into one leaf function lets the
combined optimizer (groups.py) drive lr from the shared step counter and the LR schedule,
which optax's per-transform counters and schedules would duplicate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def adamw_leaf_update(grad: jax.Array, param: jax.Array, exp_avg: jax.Array, exp_avg_sq: jax.Array,
                      *, step: jax.Array, lr: jax.Array, beta1: float, beta2: float, eps: float,
                      weight_decay: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One AdamW step for one leaf.

    `step` is the 1-based step number (after incrementing), `lr` the already-scheduled
    learning rate. Returns (update to add to `param` (fp32), new exp_avg, new exp_avg_sq);
    the moments keep their stored dtype.
    """
    p32 = param.astype(jnp.float32)
    g32 = grad.astype(jnp.float32)
    m32 = exp_avg.astype(jnp.float32)
    v32 = exp_avg_sq.astype(jnp.float32)
    lr = jnp.asarray(lr, jnp.float32)
    b1 = jnp.float32(beta1)
    b2 = jnp.float32(beta2)
    t = jnp.asarray(step, jnp.float32)

    decayed = p32 * (1.0 - lr * jnp.float32(weight_decay))
    m32 = m32 + (1.0 - b1) * (g32 - m32)
    v32 = v32 + (1.0 - b2) * (jnp.square(g32) - v32)
    bias1 = 1.0 - b1 ** t
    bias2 = 1.0 - b2 ** t
    denom = jnp.sqrt(v32 / bias2) + jnp.float32(eps)
    new_p = decayed - (lr / bias1) * (m32 / denom)
    # Returned as a difference so that optax.apply_updates reproduces nanochat's fp32 result:
    # new_p and p32 are within 2x of each other for any sane step, so the subtraction is exact
    # (Sterbenz) and p32 + (new_p - p32) == new_p bit for bit (then cast to the param dtype).
    return new_p - p32, m32.astype(exp_avg.dtype), v32.astype(exp_avg_sq.dtype)
