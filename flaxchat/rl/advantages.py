"""Host-side (NumPy) pieces of the GRPO objective: per-sample advantages and per-token loss weights.

A step's rollouts are P prompts x G samples. `compute_advantages` turns the (P, G) rewards into
(P, G) advantages with a group baseline; `token_weights` turns the (N, T) loss mask of the rows
(N = P*G) into the weights the jitted loss multiplies each token's objective by, such that the
training loop's micro-batch averaging reproduces the chosen aggregation over the WHOLE step batch.
"""

from __future__ import annotations

import numpy as np

ESTIMATORS = ("grpo", "drgrpo", "rloo")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


class RLConfigError(ValueError):
    """An RL setting that cannot work (e.g. a group baseline with one sample per group)."""


def compute_advantages(rewards: np.ndarray, estimator: str, eps: float = 1e-6) -> np.ndarray:
    """(P, G) rewards -> (P, G) float32 advantages, each sample compared with its own group.

    grpo:   (r - mean_g) / (std_g + eps)   (DeepSeekMath GRPO, z-score within the group)
    drgrpo: r - mean_g                     (Dr. GRPO; what nanochat's chat_rl.py does)
    rloo:   r - mean of the other G-1 samples of the group  (= G/(G-1) * (r - mean_g))

    A group whose rewards are all equal carries no signal: its advantages are exactly 0 for every
    estimator (set explicitly, so float rounding in the mean can never leave a 1e-17 / eps residue).
    """
    if estimator not in ESTIMATORS:
        raise RLConfigError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be (prompts, samples_per_prompt), got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards contain NaN/inf")
    G = r.shape[1]
    if G == 1 and estimator != "drgrpo":
        raise RLConfigError(f"advantage estimator {estimator!r} needs >= 2 samples per prompt (group baseline); "
                            f"raise samples_per_prompt or use estimator='drgrpo'")
    if G == 0:
        raise ValueError("rewards have 0 samples per prompt")
    mean = r.mean(axis=1, keepdims=True)
    constant = (r.max(axis=1, keepdims=True) == r.min(axis=1, keepdims=True))
    centered = np.where(constant, 0.0, r - mean)
    if estimator == "drgrpo":
        adv = centered
    elif estimator == "rloo":
        # r_i - (sum - r_i)/(G-1) == (G*r_i - sum)/(G-1) == G/(G-1) * (r_i - mean)
        adv = centered * (G / (G - 1))
    else:
        # Population std (ddof=0): the spread of the group as the empirical distribution it is, so
        # binary rewards with success rate p give std = sqrt(p(1-p)) for any G. TRL's torch.std uses
        # ddof=1; that only rescales every advantage by the constant sqrt((G-1)/G), which the
        # learning rate absorbs. Constant groups have std 0 and centered 0 -> 0 / eps = 0, no NaN.
        std = r.std(axis=1, keepdims=True, ddof=0)
        adv = centered / (std + eps)
    return adv.astype(np.float32)


def token_weights(loss_mask: np.ndarray, aggregation: str, num_micro: int) -> np.ndarray:
    """(N, T) {0,1} loss mask -> (N, T) float32 weights for `loss = -sum(weights * objective)`.

    The training loop splits the N rows into `num_micro` equal contiguous micro-batches, computes
    each micro-batch's loss as sum(weights * per_token_loss) over its rows, and AVERAGES the
    micro-batch losses (gradients divided by num_micro). The weights therefore carry a factor
    num_micro, so that the step's loss is, over the whole N-row batch:

    token_mean:          sum over all loss tokens / number of loss tokens (DAPO / nanochat-style
                         token-level normalisation; nanochat normalises per device pass, we
                         normalise over the whole step, so the result is independent of the split).
    seq_mean_token_mean: mean over the N sequences of (mean over that sequence's loss tokens).
                         A sequence with no loss token contributes 0 but still counts in the N.

    Positions with mask 0 (prompt, padding, tool output the engine forced) get weight exactly 0,
    and so does every position of a row without loss tokens. An all-zero mask gives all-zero weights.
    """
    if aggregation not in AGGREGATIONS:
        raise RLConfigError(f"unknown loss aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    m = np.asarray(loss_mask)
    if m.ndim != 2:
        raise ValueError(f"loss_mask must be (rows, seq), got shape {m.shape}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("loss_mask must contain only 0 and 1")
    N = m.shape[0]
    if num_micro < 1 or N % num_micro != 0:
        raise RLConfigError(f"{N} rows cannot be split into num_micro={num_micro} equal micro-batches; "
                            f"make rows (prompts * samples_per_prompt) a multiple of the micro-batch count")
    m = m.astype(np.float64)
    if aggregation == "token_mean":
        w = m / max(m.sum(), 1.0)
    else:
        per_row = m.sum(axis=1, keepdims=True)
        w = m / (np.maximum(per_row, 1.0) * N)
    return (w * num_micro).astype(np.float32)
