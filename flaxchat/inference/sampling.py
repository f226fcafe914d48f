"""Token sampling for the engine: temperature, top-k, nucleus (top-p), greedy at temperature 0.

Every knob is a traced scalar, not a static argument, so changing temperature/top-k/top-p between
calls never recompiles the decode loop. Top-k and top-p need a sort of the vocabulary; a scalar
`lax.cond` skips it entirely when neither is in force (the common greedy / plain-temperature case).

Randomness is per row: the caller passes one PRNG key per row (derived with fold_in from the seed,
the row id and the token index), so a row's tokens depend only on (seed, row, position), never on
which other rows share the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_TEMPERATURE = 1e-6   # temperature 0 means greedy; the division only needs to be finite


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


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """One token per row. logits (B,V) fp32, keys (B,2) raw PRNG keys -> (B,) int32.
    temperature 0 -> argmax (the filters cannot change the argmax, so they are skipped)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered_logits(logits, temperature, top_k, top_p))
    return jnp.where(temperature <= 0, greedy, drawn.astype(jnp.int32))


def token_probs(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The sampling distribution (...,V) that `sample_tokens` draws from at temperature > 0."""
    shape = logits.shape
    flat = filtered_logits(logits.reshape(-1, shape[-1]), temperature, top_k, top_p)
    return jax.nn.softmax(flat, axis=-1).reshape(shape)
