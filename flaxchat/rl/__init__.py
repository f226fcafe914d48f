"""GRPO: group advantages and token weights (NumPy, host) and the clipped policy objective (JAX)."""

from flaxchat.rl.advantages import (AGGREGATIONS, ESTIMATORS, RLConfigError, compute_advantages,
                                    token_weights)
from flaxchat.rl.objective import grpo_loss_fn, policy_loss, sequence_logprobs

__all__ = ["AGGREGATIONS", "ESTIMATORS", "RLConfigError", "compute_advantages", "token_weights",
           "grpo_loss_fn", "policy_loss", "sequence_logprobs"]
