"""Validation bits-per-byte: the tokenizer-independent loss every training stage reports.

bpb = sum of per-token NLL (nats) over tokens that stand for text / (ln 2 * their UTF-8 bytes).
Special tokens (0 bytes) and ignored targets (-1) count for neither sum, as in nanochat. `val_loss`
is the mean NLL per non-ignored target, special tokens included (SFT's held-out loss). The sums
accumulate on the device; the host reads them once per evaluation.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.batches import make_global_batch


def make_bpb_evaluator(model: nnx.Module, mesh: jax.sharding.Mesh, token_bytes: np.ndarray,
                       val_batches: Callable[[], Iterable[dict[str, np.ndarray]]], num_batches: int
                       ) -> Callable[[nnx.Module], dict[str, float]]:
    """`val_batches()` yields host-local {"inputs","targets"} (B_local, T) batches, the same ones
    each call (a fresh deterministic loader), of which the first `num_batches` are used."""
    if num_batches < 1:
        raise ValueError(f"eval needs at least one batch, got num_batches={num_batches}; raise eval_tokens")
    graphdef, _ = nnx.split(model)
    table = jnp.asarray(token_bytes, jnp.int32)

    @jax.jit
    def sums(state, inputs, targets):
        m = nnx.merge(graphdef, state)
        nll = m(inputs, targets, loss_reduction="none")                    # (B,T) nats, 0 where ignored
        nbytes = jnp.where(targets >= 0, table[jnp.maximum(targets, 0)], 0)
        return jnp.sum(jnp.where(nbytes > 0, nll, 0.0)), jnp.sum(nbytes), jnp.sum(nll), jnp.sum(targets >= 0)

    def evaluate(m: nnx.Module) -> dict[str, float]:
        state = nnx.state(m)
        nats = all_nats = jnp.zeros((), jnp.float32)
        total = count = jnp.zeros((), jnp.int32)
        seen = 0
        for batch in itertools.islice(val_batches(), num_batches):
            arrays = make_global_batch({k: batch[k] for k in ("inputs", "targets")}, mesh)
            n, b, a, c = sums(state, arrays["inputs"], arrays["targets"])
            nats, total, all_nats, count, seen = nats + n, total + b, all_nats + a, count + c, seen + 1
        if seen == 0:
            raise ValueError("the validation split yielded no batches; add validation data or lower eval_tokens")
        return {"val_bpb": float(nats) / (math.log(2) * max(int(total), 1)),
                "val_loss": float(all_nats) / max(int(count), 1), "val_batches": seen}

    return evaluate
