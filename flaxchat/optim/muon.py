"""nanochat's Muon step (`muon_step_fused` in nanochat/optim.py) for one stacked matrix leaf.

Order of operations, exactly nanochat's:
  1. Nesterov momentum:   buf <- lerp(buf, g, 1-mu);  g <- lerp(g, buf, mu)
  2. cast to the polar dtype (bf16 on accelerators, fp32 on CPU, like nanochat's COMPUTE_DTYPE)
  3. MuonEq row equilibration: every output row rescaled to the mean row norm ||X||_F / sqrt(rows)
  4. Polar Express: X / (||X||_F * 1.01 + 1e-6), then 5 quintic iterations with fixed coefficients
     (for fp32 MLP matrices evaluated on the Gram matrix: `_polar_gram`, same math, 1.5x fewer flops)
  5. cast back to the param dtype; Muon+ renormalisation: ||g||_F <- sqrt(min(rows, cols))
  6. NorMuon: factored second moment (per output row, or per input column for wide matrices),
     beta2 EMA without bias correction, rescale then restore the pre-scaling Frobenius norm
  7. cautious decoupled weight decay: p <- p - lr*g - lr*wd*p*[g*p >= 0],
     with lr = lr * sqrt(max(1, rows/cols)).

Layout. nanochat's weights are torch (out, in): "rows" = output features. Flax kernels are
(in, out), stacked on leading axes (L, in, out). Everything below is written directly in the Flax
layout as the exact transpose of nanochat's computation: rows = shape[-1] (output dim),
cols = shape[-2] (input dim). Leading axes are batch (each layer's matrix is independent), so a
stacked (L, in, out) leaf is L separate Muon updates computed in one batched graph.

Dtypes. Elementwise chains are computed in fp32 and rounded once to the polar dtype where
nanochat's compiled kernel stores a bf16 tensor; matmuls take and return the polar dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# (a, b, c) per iteration; Polar Express, arXiv 2505.16932 (num_iters=5, safety 2e-2, cushion 2)
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


class MuonShapeError(ValueError):
    """Muon was given something that is not a (stack of) matrices."""


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) in nanochat's sense for a Flax (..., in, out) kernel: rows = out, cols = in."""
    if len(shape) < 2:
        raise MuonShapeError(f"Muon needs a matrix (..., in, out), got shape {tuple(shape)}; "
                             "route vectors and scalars to an AdamW group")
    return int(shape[-1]), int(shape[-2])


def muon_lr_scale(shape: Sequence[int]) -> float:
    """nanochat's per-matrix LR factor sqrt(max(1, rows/cols)), rows = output dim (Flax last axis)."""
    rows, cols = _rows_cols(shape)
    return max(1.0, rows / cols) ** 0.5


def second_moment_axis(shape: Sequence[int]) -> int:
    """Flax axis the NorMuon second moment is averaged over.

    nanochat keeps one statistic per output row when rows >= cols (mean over the input dim,
    torch dim -1 == Flax axis -2), else one per input column (mean over the output dim,
    torch dim -2 == Flax axis -1)."""
    rows, cols = _rows_cols(shape)
    return -2 if rows >= cols else -1


def second_moment_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the factored NorMuon buffer for a param of `shape`: the reduced axis becomes 1.
    Shard it like the param with the reduced axis replicated."""
    out = list(shape)
    out[second_moment_axis(shape)] = 1
    return tuple(out)


def _frobenius(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))


def row_equilibrate(x: jax.Array) -> jax.Array:
    """MuonEq: scale each output row (Flax column) to the mean row norm ||X||_F / sqrt(rows)."""
    rows, _ = _rows_cols(x.shape)
    x32 = x.astype(jnp.float32)
    target = _frobenius(x32) / (rows ** 0.5)
    row_norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x32), axis=-2, keepdims=True)), 1e-6)
    scale = (target / row_norm).astype(x.dtype)     # nanochat casts the scale, then multiplies
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


GRAM_MIN_ASPECT = 2      # long side / short side from which fp32 Polar Express iterates on the Gram matrix


def polar_express(x: jax.Array, ns_steps: int = 5, method: str = "auto") -> jax.Array:
    """Approximate polar factor of every matrix in `x` (..., in, out), computed in x's dtype.

    Normalises by ||X||_F * 1.01 + 1e-6 first. method "iterate" is nanochat's loop, using the smaller
    Gram matrix and mirroring its tall/wide branch (the branch condition is on the torch (out, in)
    shape). "gram" (fp32 only) is the same polynomial evaluated on the Gram matrix (`_polar_gram`);
    "auto" takes it for fp32 matrices at least GRAM_MIN_ASPECT times longer than wide (the MLP's),
    where it is ~1.5x faster, and nanochat's loop otherwise."""
    if not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
        raise MuonShapeError(f"ns_steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {ns_steps}")
    if method not in ("auto", "iterate", "gram"):
        raise MuonShapeError(f"Polar Express method={method!r} must be 'auto', 'iterate' or 'gram'")
    dtype = x.dtype
    n_in, n_out = x.shape[-2], x.shape[-1]
    if method == "auto":
        wide = max(n_in, n_out) >= GRAM_MIN_ASPECT * min(n_in, n_out)
        method = "gram" if dtype == jnp.float32 and wide and ns_steps >= 3 else "iterate"
    if method == "gram" and dtype != jnp.float32:
        raise MuonShapeError(f"Polar Express method='gram' needs fp32 (got {dtype.name}): in bf16 it doubled "
                             "the loop's error on well-conditioned inputs; use method='iterate'")
    # fp32 mode means true fp32 products (XLA on GPU would otherwise use TF32 for fp32 dots)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    mm = lambda u, v: jnp.matmul(u, v, precision=precision)
    f32 = lambda m: m.astype(jnp.float32)
    denom = f32(_frobenius(x).astype(dtype)) * 1.01 + 1e-6
    x = (f32(x) / denom).astype(dtype)
    xt = lambda m: jnp.swapaxes(m, -1, -2)
    if method == "gram":
        coeffs = POLAR_EXPRESS_COEFFS[:ns_steps]
        return _polar_gram(x, coeffs, mm) if n_out >= n_in else xt(_polar_gram(xt(x), coeffs, mm))
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if n_in >= n_out:    # torch wide/square (out <= in): Gram over the output dim, (out, out)
            gram = mm(xt(x), x)
            poly = (b * f32(gram) + c * f32(mm(gram, gram))).astype(dtype)
            x = (a * f32(x) + f32(mm(x, poly))).astype(dtype)
        else:                # torch tall (out > in): Gram over the input dim, (in, in)
            gram = mm(x, xt(x))
            poly = (b * f32(gram) + c * f32(mm(gram, gram))).astype(dtype)
            x = (a * f32(x) + f32(mm(poly, x))).astype(dtype)
    return x


def _polar_gram(x: jax.Array, coeffs, mm) -> jax.Array:
    """Polar Express of wide fp32 matrices x (..., m, n), m < n, by iterating on m x m matrices.

    Deliberately not nanochat's loop (same math, different rounding). Each iteration is
    X <- Q(A) X with A = X X^T and Q(A) = aI + bA + cA^2, a polynomial in A; so the next Gram matrix is
    Q A Q = Q^2 A, and the result is (Q_k ... Q_0) X. Forming A squares X's condition number, so in fp32
    small singular directions blur as the products pile up (measured: up to 6e-5 off float64 on a
    log-spaced spectrum, where nanochat's loop is 3e-6 off); one restart before the last two iterations
    (X <- (the Q's so far) X, A recomputed) brings it back to nanochat's level
    (tests/test_optim_reference.py). For 5 iterations that is 4 m^2 n + 14 m^3 multiply-adds against
    nanochat's 5 (2 m^2 n + m^3): 1.5x fewer for the MLP's 4:1 matrices, but 1.2x more for square ones
    (hence GRAM_MIN_ASPECT). bf16 keeps the loop: there this path was 5.7% off float64 on gaussian
    384x1536 inputs where the loop is 2.8% off."""
    m = x.shape[-2]
    eye = jnp.eye(m, dtype=x.dtype)
    restart = len(coeffs) - 2 if len(coeffs) >= 3 else None
    gram = mm(x, jnp.swapaxes(x, -1, -2))
    acc = None                                                # product of the Q's since the last restart
    for i, (a, b, c) in enumerate(coeffs):
        if i == restart:
            x = mm(acc, x)
            gram, acc = mm(x, jnp.swapaxes(x, -1, -2)), None
        q = a * eye + b * gram + c * mm(gram, gram)
        acc = q if acc is None else mm(q, acc)
        if i + 1 < len(coeffs) and i + 1 != restart:
            gram = mm(q, mm(q, gram))
    return mm(acc, x)


def normuon_scale(g: jax.Array, second_moment: jax.Array, beta2: float) -> tuple[jax.Array, jax.Array]:
    """NorMuon variance reduction. Returns (rescaled g in fp32, new second moment in its dtype)."""
    axis = second_moment_axis(g.shape)
    red_size = g.shape[axis]
    g32 = g.astype(jnp.float32)
    v_mean = jnp.mean(jnp.square(g32), axis=axis, keepdims=True)
    v_norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * red_size)
    buf32 = second_moment.astype(jnp.float32)
    buf32 = buf32 + (1.0 - jnp.float32(beta2)) * (v_mean - buf32)
    new_buf = buf32.astype(second_moment.dtype)
    step_size = jax.lax.rsqrt(jnp.maximum(new_buf.astype(jnp.float32), 1e-10))
    scaled_sq_sum = (v_mean * red_size) * jnp.square(step_size)
    v_norm_new = jnp.sqrt(jnp.sum(scaled_sq_sum, axis=(-2, -1), keepdims=True))
    final_scale = step_size * (v_norm / jnp.maximum(v_norm_new, 1e-10))
    return g32 * final_scale, new_buf


def muon_leaf_update(grad: jax.Array, param: jax.Array, momentum_buffer: jax.Array,
                     second_moment: jax.Array, *, lr: jax.Array, momentum: jax.Array,
                     weight_decay: jax.Array, beta2: float = 0.9, ns_steps: int = 5,
                     polar_dtype: jnp.dtype = jnp.bfloat16) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Muon step for a (..., in, out) leaf.

    `lr` is the scheduled group LR *before* the sqrt(max(1, rows/cols)) factor (applied here),
    `momentum` and `weight_decay` the scheduled values for this step. Returns
    (update to add to `param` (fp32), new momentum buffer, new second moment)."""
    shape = param.shape
    _rows_cols(shape)
    mu = jnp.asarray(momentum, jnp.float32)
    g32 = grad.astype(jnp.float32)
    buf32 = momentum_buffer.astype(jnp.float32)
    buf32 = buf32 + (1.0 - mu) * (g32 - buf32)
    g32 = g32 + mu * (buf32 - g32)                     # Nesterov

    x = row_equilibrate(g32.astype(polar_dtype))
    x = polar_express(x, ns_steps)
    g32 = x.astype(jnp.float32)
    rows, cols = _rows_cols(shape)
    target_norm = min(rows, cols) ** 0.5               # Muon+: norm of a semi-orthogonal matrix
    g32 = g32 * (target_norm / jnp.maximum(_frobenius(g32), 1e-6))
    g32, new_second = normuon_scale(g32, second_moment, beta2)

    p32 = param.astype(jnp.float32)
    lr_eff = jnp.asarray(lr, jnp.float32) * jnp.float32(muon_lr_scale(shape))
    wd = jnp.asarray(weight_decay, jnp.float32)
    cautious = (g32 * p32 >= 0).astype(jnp.float32)   # decay only where update and weight agree in sign
    update = -(lr_eff * g32 + lr_eff * wd * p32 * cautious)
    return update, buf32.astype(momentum_buffer.dtype), new_second


def polar_dtype_for(compute_dtype: str, backend: str | None = None) -> jnp.dtype:
    """nanochat runs Polar Express in bf16 when its compute dtype is bf16, else fp32.
    `compute_dtype` is ModelConfig.compute_dtype ("auto" = bf16 on GPU/TPU, fp32 on CPU)."""
    if compute_dtype == "auto":
        backend = backend or jax.default_backend()
        compute_dtype = "bfloat16" if backend in ("gpu", "cuda", "rocm", "tpu") else "float32"
    if compute_dtype not in ("bfloat16", "float32"):
        raise MuonShapeError(f"polar dtype must be 'bfloat16' or 'float32', got {compute_dtype!r}")
    return jnp.dtype(compute_dtype)


__all__ = ["POLAR_EXPRESS_COEFFS", "MuonShapeError", "muon_leaf_update", "muon_lr_scale", "normuon_scale",
           "polar_dtype_for", "polar_express", "row_equilibrate", "second_moment_axis", "second_moment_shape"]
