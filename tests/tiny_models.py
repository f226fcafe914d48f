"""Tiny random GPTs and a tiny tokenizer for engine tests (a helper module, not a test).

The weights are scaled up so logits are far from ties and every cached-path feature (smear,
backout, value embeddings) is live.
"""

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.config import ModelConfig
from flaxchat.model.gpt import ModelSpec, init_params
from flaxchat.tokenizer import Tokenizer

MAX_LEN = 64


class TinyModel:
    """What the engine needs from a GPT: a static `spec` and `param_tree()`."""

    def __init__(self, vocab_size: int, depth: int = 2, seed: int = 0, resid_jitter: bool = True):
        cfg = ModelConfig(depth=depth, aspect_ratio=32, head_dim=32, sequence_len=MAX_LEN, vocab_size=vocab_size,
                          window_pattern="L", compute_dtype="float32")
        cfg.derive()
        self.spec = ModelSpec.from_config(cfg)
        leaves, treedef = jax.tree.flatten(jax.jit(init_params, static_argnums=0)(self.spec, jax.random.PRNGKey(seed)))
        rng = np.random.default_rng(seed)
        p = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim >= 2 else 1),
                                                     jnp.float32) for x in leaves])
        p["lm_head"] = p["lm_head"] * 3.0
        if resid_jitter:
            p["resid_lambdas"] = 1.0 + 0.1 * p["resid_lambdas"]
        p["smear_lambda"], p["backout_lambda"] = jnp.asarray(0.8), jnp.asarray(0.3)
        self.params = p

    def param_tree(self):
        return self.params


def tiny_tokenizer(with_sums: bool = True) -> Tokenizer:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "a", "big", "red", "sum", "print", "range"]
    if with_sums:
        texts = [" ".join(rng.choice(words, 12)) + f" {rng.integers(0, 1000)}+{rng.integers(0, 100)}" for _ in range(200)]
    else:
        texts = [" ".join(rng.choice(words, 12)) + f" {rng.integers(0, 1000)}" for _ in range(200)]
    return Tokenizer.train(texts, vocab_size=300)
