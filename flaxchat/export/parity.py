"""Does an exported model compute what ours computes? Logits and greedy ids, JAX as the reference.

Every format's runner is a function `logits(ids) -> (B, T, vocab) fp32` over int token ids; the
same two checks are applied to each:
- logits on a fixed probe batch, compared as max|exported - ours| / max|ours| (relative to the
  logits' scale: an element-wise ratio explodes at logits near zero, which softcapped logits have);
- greedy decoding of `new_tokens` from a text prompt: every step the full sequence is rerun (the
  runner under test needs no cache for this) and the argmax ids must be identical.
The reference pads the sequence to its final length once, so one jitted forward serves every step:
with causal attention, the logits at position t do not depend on what follows.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model.gpt import ModelSpec, gpt_forward

LogitsFn = Callable[[np.ndarray], np.ndarray]


def probe_ids(spec: ModelSpec, batch: int = 2, length: int = 24, seed: int = 0) -> np.ndarray:
    """A fixed batch of random non-special token ids (B, T) int64, shorter than the model's window."""
    length = min(length, spec.sequence_len)
    return np.random.default_rng(seed).integers(0, spec.vocab_size, size=(batch, length), dtype=np.int64)


def jax_logits_fn(params: dict[str, Any], spec: ModelSpec) -> LogitsFn:
    forward = jax.jit(lambda p, ids: gpt_forward(p, spec, ids))
    params = jax.tree.map(jnp.asarray, params)
    return lambda ids: np.asarray(forward(params, jnp.asarray(ids, jnp.int32)), np.float32)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want)) / max(np.max(np.abs(want)), 1e-30))


def greedy_ids(logits_fn: LogitsFn, prompt: list[int], new_tokens: int, pad_to: int | None = None) -> list[int]:
    """Greedy continuation of `prompt`. With `pad_to`, every call sees a (1, pad_to) row (the tail is
    padding the causal model never looks at), for runtimes compiled for one fixed shape."""
    ids = list(prompt)
    for _ in range(new_tokens):
        row = np.asarray(ids, np.int64)[None]
        if pad_to is not None:
            row = np.pad(row, ((0, 0), (0, pad_to - row.shape[1])))
        ids.append(int(np.argmax(logits_fn(row)[0, len(ids) - 1])))
    return ids[len(prompt):]


def check(name: str, logits_fn: LogitsFn, reference: LogitsFn, probe: np.ndarray, prompt: list[int],
          new_tokens: int, rtol: float, fixed_len: int | None = None) -> dict[str, Any]:
    """Compare one runtime against the reference; returns the figures and a pass/fail flag."""
    want_logits = reference(probe if fixed_len is None else _pad(probe, fixed_len))[:, :probe.shape[1]]
    got_logits = logits_fn(probe if fixed_len is None else _pad(probe, fixed_len))[:, :probe.shape[1]]
    if got_logits.shape != want_logits.shape:
        raise AssertionError(f"{name}: logits shape {got_logits.shape}, expected {want_logits.shape}")
    err = relative_error(got_logits, want_logits)
    pad_to = fixed_len if fixed_len is not None else len(prompt) + new_tokens
    want_ids = greedy_ids(reference, prompt, new_tokens, pad_to=pad_to)
    got_ids = greedy_ids(logits_fn, prompt, new_tokens, pad_to=fixed_len)
    return {"max_rel_err": err, "greedy_match": got_ids == want_ids, "greedy_tokens": new_tokens,
            "passed": bool(err <= rtol and got_ids == want_ids), "rtol": rtol}


def _pad(ids: np.ndarray, length: int) -> np.ndarray:
    return np.pad(ids, ((0, 0), (0, length - ids.shape[1])))
