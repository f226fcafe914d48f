"""Greedy samples from fixed prompts during training: a quick look at what the model says.

Uses the model's KV-cache decode path (prefill the prompt, then one jitted scan over the new
tokens), compiled once per prompt length and reused at every sampling interval.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.model.kv_cache import decode, init_cache, prepare_params


def make_sampler(tokenizer, prompts: list[str], max_new_tokens: int = 48
                 ) -> Callable[[nnx.Module, int], list[dict[str, str]]]:
    encoded = [tokenizer.encode(p, prepend=tokenizer.bos_token_id) for p in prompts]

    @functools.partial(jax.jit, static_argnums=(0,))
    def generate(spec, params, prompt):                                   # prompt (1,P) int32
        params = prepare_params(params, spec)      # split the layer weights once, not every scanned step
        cache = init_cache(spec, 1, prompt.shape[1] + max_new_tokens)
        logits, cache = decode(params, spec, cache, prompt)
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

        def one(carry, _):
            cache, tok = carry
            logits, cache = decode(params, spec, cache, tok[:, None])
            return (cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)), tok

        _, toks = jax.lax.scan(one, (cache, first), None, length=max_new_tokens)
        return toks[:, 0]                                                  # (max_new,)

    def sample(model: nnx.Module, step: int) -> list[dict[str, str]]:
        params = model.param_tree()
        out = []
        for text, ids in zip(prompts, encoded):
            new = np.asarray(generate(model.spec, params, jnp.asarray([ids], jnp.int32))).tolist()
            specials = set(tokenizer.special_tokens.values())
            cut = next((i for i, t in enumerate(new) if t in specials), len(new))
            out.append({"prompt": text, "completion": tokenizer.decode(new[:cut])})
        return out

    return sample
