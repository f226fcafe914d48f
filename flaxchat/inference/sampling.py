"""Token sampling for the engine: temperature, top-k, nucleus (top-p), greedy at temperature 0.

Every knob is a traced scalar, not a static argument, so changing temperature/top-k/top-p between
calls never recompiles the decode loop. Top-k and top-p need a sort of the vocabulary; a scalar
`lax.cond` skips it entirely when neither is in force (the common greedy / plain-temperature case).

Randomness is per row: the caller passes one PRNG key per row (derived with fold_in from the seed,
the row id and the token index), so a row's tokens depend only on (seed, row, position), never on
which other rows share the batch.

How a token is drawn: by inverting the CDF with ONE uniform per row (`draw`), not by
`jax.random.categorical`'s Gumbel-max, which generates and logs a random number per vocabulary entry:
at vocab 32768 that was ~0.7 ms per row per token on CPU, more than the rest of a small model's
decode step. The CDF is taken in two levels (block sums, then one block), so the work is the
exponentials plus O(V) adds, and no length-V cumulative sum is ever formed. Same distribution, a
different random stream than categorical (nanochat samples with torch.multinomial, a third one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_TEMPERATURE = 1e-6   # temperature 0 means greedy; the division only needs to be finite
CDF_BLOCK = 128          # vocabulary entries per block of the two-level inverse CDF


def filtered_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits (B,V) / temperature with every token outside the top-k and the nucleus set to -inf.

    top_k <= 0 and top_p >= 1 disable the respective filter. The nucleus is the smallest set of
    most likely tokens (after top-k) whose probability reaches top_p; ties at the threshold stay in."""
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, MIN_TEMPERATURE)

    def restrict(x: jax.Array) -> jax.Array:
        V = x.shape[-1]
        ranked = -jnp.sort(-x, axis=-1)                                         # descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        ranked = jnp.where(jnp.arange(V) < k, ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum((mass_before < top_p) & (jnp.arange(V) < k), axis=-1), 1)   # (B,)
        threshold = jnp.take_along_axis(ranked, (n_keep - 1)[:, None], axis=-1)                 # (B,1)
        return jnp.where(x >= threshold, x, -jnp.inf)

    return jax.lax.cond((top_k > 0) | (top_p < 1.0), restrict, lambda x: x, scaled)


def draw(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Row b's index i with probability weights[b,i] / sum(weights[b]), by inverse CDF from one
    uniform u[b] in [0, 1). weights (B,V) >= 0 fp32, not all zero in a row -> (B,) int32.

    Index i is taken where cdf(i-1) <= u*total < cdf(i), so a zero-weight entry (filtered out, or
    padding) is never taken; where rounding puts u*total past the last cumulative sum, the last
    entry with weight is taken instead."""
    B, V = weights.shape
    n_blocks = -(-V // CDF_BLOCK)
    rows = jnp.arange(B)
    w = jnp.pad(weights.astype(jnp.float32), ((0, 0), (0, n_blocks * CDF_BLOCK - V))).reshape(B, n_blocks, CDF_BLOCK)

    def pick(cum: jax.Array, mass: jax.Array, target: jax.Array) -> jax.Array:
        last = mass.shape[-1] - 1 - jnp.argmax(mass[:, ::-1] > 0, axis=-1)      # last entry with weight
        return jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), last).astype(jnp.int32)

    block_mass = w.sum(axis=-1)                                                 # (B, n_blocks)
    block_cum = jnp.cumsum(block_mass, axis=-1)
    target = u.astype(jnp.float32) * block_cum[:, -1]
    j = pick(block_cum, block_mass, target)
    before = jnp.where(j > 0, block_cum[rows, jnp.maximum(j - 1, 0)], 0.0)
    inner = w[rows, j]                                                          # (B, CDF_BLOCK)
    i = pick(jnp.cumsum(inner, axis=-1), inner, target - before)
    return j * CDF_BLOCK + i


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """One token per row. logits (B,V) fp32, keys (B,2) raw PRNG keys -> (B,) int32.
    temperature 0 -> argmax (the filters cannot change the argmax, so they are skipped; so is the
    draw, by a scalar cond)."""
    def greedy() -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> jax.Array:
        z = filtered_logits(logits, temperature, top_k, top_p)
        weights = jnp.exp(z - z.max(axis=-1, keepdims=True))
        return draw(weights, jax.vmap(lambda key: jax.random.uniform(key, ()))(keys))

    return jax.lax.cond(temperature > 0, sampled, greedy)


def token_probs(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The sampling distribution (...,V) that `sample_tokens` draws from at temperature > 0."""
    shape = logits.shape
    flat = filtered_logits(logits.reshape(-1, shape[-1]), temperature, top_k, top_p)
    return jax.nn.softmax(flat, axis=-1).reshape(shape)
