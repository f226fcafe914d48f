"""The GRPO policy objective in JAX (jit-safe, no host syncs).

PPO-style clipped surrogate on per-token log-probs, with group advantages per row and per-token
weights from `flaxchat.rl.advantages.token_weights`, plus an optional k3 KL penalty to a frozen
reference policy. nanochat's chat_rl.py is the special case: on-policy (old_logp == logp, so
ratio == 1 and clipping never binds), estimator 'drgrpo', kl_beta = 0, token-mean weights.

Masked positions (weight 0: prompt, padding, tool output forced by the engine) contribute exactly
zero value and exactly zero gradient whatever logp/old_logp/ref_logp hold there (even inf/NaN):
every input is passed through `jnp.where(live, x, 0)` before use and every per-token term through
`jnp.where(live, term, 0)` after, so no inf * 0 can ever produce a NaN, forward or backward.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flaxchat.model.gpt import IGNORE_INDEX


def _check_hparams(clip_low: Any, clip_high: Any, kl_beta: Any) -> None:
    """Validate whatever is a concrete Python number (traced values are the caller's business)."""
    if isinstance(clip_low, (int, float)) and not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low={clip_low} must be in [0, 1) (ratio is clipped to [1 - clip_low, 1 + clip_high])")
    if isinstance(clip_high, (int, float)) and clip_high < 0.0:
        raise ValueError(f"clip_high={clip_high} must be >= 0")
    if isinstance(kl_beta, (int, float)) and kl_beta < 0.0:
        raise ValueError(f"kl_beta={kl_beta} must be >= 0")


def _uses_kl(kl_beta: Any) -> bool:
    return not (isinstance(kl_beta, (int, float)) and kl_beta == 0)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, weights: jax.Array, *,
                clip_low: float, clip_high: float, kl_beta: float = 0.0,
                ref_logp: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate GRPO loss -> (scalar loss, dict of scalar stats).

    logp, old_logp, ref_logp: (B, T) fp32 log-probs of the sampled targets under the current,
    rollout (behaviour) and reference policies. advantages: (B,) one per row. weights: (B, T),
    0 where there is no loss.

        ratio = exp(logp - old_logp)
        obj   = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        kl    = exp(ref - logp) - (ref - logp) - 1          (k3, unbiased, >= 0; only if kl_beta > 0)
        loss  = -sum(weights * (obj - kl_beta * kl))

    kl_beta == 0 (a Python number) drops the KL term from the loss; ref_logp is then not needed,
    and if given only feeds the 'kl' stat (monitoring). A non-zero or traced kl_beta requires it.

    Stats (no gradient), each a weighted mean with the weights normalised to sum 1:
      clip_frac: share of tokens where min() picks the clipped branch, i.e. the ratio left the
                 trust region in the direction the advantage pushes (A > 0 and ratio > 1 + clip_high,
                 or A < 0 and ratio < 1 - clip_low): exactly the tokens whose gradient clipping zeroes.
      ratio:     mean ratio.  kl: mean k3 KL (0 without ref_logp).  entropy: mean -logp (a proxy).
    """
    _check_hparams(clip_low, clip_high, kl_beta)
    use_kl = _uses_kl(kl_beta)
    if use_kl and ref_logp is None:
        raise ValueError("kl_beta > 0 needs ref_logp (per-token log-probs under the reference policy)")
    w = jnp.asarray(weights, jnp.float32)
    live = w != 0
    lp = jnp.where(live, logp, 0.0)
    old = jnp.where(live, old_logp, 0.0)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]

    ratio = jnp.exp(lp - old)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    obj = jnp.minimum(unclipped, clipped)

    kl = None
    if ref_logp is not None:
        d = jnp.where(live, ref_logp, 0.0) - lp
        kl = jnp.exp(d) - d - 1.0
    per_token = obj - kl_beta * kl if use_kl else obj
    loss = -jnp.sum(jnp.where(live, w * per_token, 0.0))

    # stats: weights normalised to sum 1 (an all-zero weight matrix gives all-zero stats)
    sg = jax.lax.stop_gradient
    wn = sg(w) / jnp.maximum(jnp.sum(sg(w)), jnp.finfo(jnp.float32).tiny)

    def wmean(x):
        return jnp.sum(jnp.where(live, wn * sg(x), 0.0))

    stats = {
        "clip_frac": wmean((clipped < unclipped).astype(jnp.float32)),
        "ratio": wmean(ratio),
        "kl": wmean(kl) if kl is not None else jnp.zeros((), jnp.float32),
        "entropy": wmean(-lp),
    }
    return loss, stats


def sequence_logprobs(model: Callable[..., jax.Array], inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """(B, T) log-prob of each target token given its prefix; 0 where target == -1.

    The GPT returns the per-token NLL with loss_reduction='none' (already 0 at ignored targets)."""
    nll = model(inputs, targets, loss_reduction="none")
    return jnp.where(targets == IGNORE_INDEX, 0.0, -nll.astype(jnp.float32))


def grpo_loss_fn(clip_low: float, clip_high: float, kl_beta: float = 0.0
                 ) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
    """A `loss_fn(model, batch) -> scalar` for flaxchat.train.loop.

    batch: inputs, targets (B, T) int32; advantages (B,) f32; old_logp, weights (B, T) f32;
    ref_logp (B, T) f32 only when kl_beta > 0. Without 'old_logp' the batch is taken as on-policy
    (old_logp = stop_gradient(logp): ratio 1, nanochat's REINFORCE gradient, one forward less)."""
    _check_hparams(clip_low, clip_high, kl_beta)
    use_kl = _uses_kl(kl_beta)

    def loss_fn(model, batch: dict[str, jax.Array]) -> jax.Array:
        if use_kl and "ref_logp" not in batch:
            raise ValueError(f"kl_beta={kl_beta} > 0 but the batch has no 'ref_logp'; "
                             f"compute reference log-probs for the rollouts or set kl_beta=0")
        logp = sequence_logprobs(model, batch["inputs"], batch["targets"])
        old_logp = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
        loss, _ = policy_loss(logp, old_logp, batch["advantages"], batch["weights"],
                              clip_low=clip_low, clip_high=clip_high, kl_beta=kl_beta,
                              ref_logp=batch.get("ref_logp") if use_kl else None)
        return loss

    return loss_fn
