"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Per iteration of one compiled `lax.while_loop` (per row, rows are independent):
  both caches hold the sequence except its last token `cur`;
  draft:  feed cur, d1, ..., dk one at a time (k+1 tiny forwards), sampling d1..dk from q1..qk
          (the (k+1)-th forward only writes dk into the draft cache, so both caches stay in step);
  target: one forward of [cur, d1..dk] (T = k+1) -> p1..p(k+1);
  accept: greedy: while d_i == argmax p_i; sampling: d_i with probability min(1, p_i(d_i)/q_i(d_i))
          (Leviathan et al. 2023), which leaves the target's distribution exactly unchanged;
  next:   greedy: argmax p(n+1); sampling: from norm(max(0, p(n+1) - q(n+1))) after a rejection,
          from p(k+1) when all k were accepted;
  emit d1..dn, next; roll both caches back by setting pos = old + 1 + n (the stale entries beyond
          are overwritten before anything can attend to them) and re-deriving prev_embed (the smear
          input) from the last kept token.
Under greedy decoding the tokens are therefore exactly the target's own greedy tokens.
Tool calls are not run here (Engine.generate refuses use_tools with a draft).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.engine import inference_params, prefill, row_keys
from flaxchat.kv_cache import KVCache, decode
from flaxchat.model import ModelSpec, embed_tokens
from flaxchat.sampling import sample_tokens, token_probs


class SpecState(NamedTuple):
    tcache: KVCache
    dcache: KVCache
    cur: jax.Array        # (B,) last emitted token, in neither cache yet
    out: jax.Array        # (B,N)
    n_out: jax.Array      # (B,)
    done: jax.Array       # (B,)
    row_key: jax.Array    # (B,2)
    steps: jax.Array      # () target forwards so far (for acceptance statistics)


def _fold(keys: jax.Array, i: int | jax.Array) -> jax.Array:
    return jax.vmap(lambda key: jax.random.fold_in(key, i))(keys)


def _rollback(params: dict, spec: ModelSpec, new: KVCache, old: KVCache, pos: jax.Array, last: jax.Array,
              active: jax.Array) -> KVCache:
    prev = embed_tokens(params, spec, last[:, None])[:, 0].astype(old.prev_embed.dtype)
    return new._replace(pos=jnp.where(active, pos, old.pos), prev_embed=jnp.where(active[:, None], prev, old.prev_embed))


def speculative_step(tparams: dict, tspec: ModelSpec, dparams: dict, dspec: ModelSpec, k: int,
                     st: SpecState, cfg) -> SpecState:
    B, N = st.out.shape
    rows = jnp.arange(B)
    active = ~st.done
    base = jax.vmap(jax.random.fold_in)(st.row_key, st.n_out)
    temp, top_k, top_p = cfg.temperature, cfg.top_k, cfg.top_p

    def draft_one(carry, i):
        dcache, tok = carry
        logits, dcache = decode(dparams, dspec, dcache, tok[:, None])
        nxt = sample_tokens(logits[:, 0], _fold(base, i), temp, top_k, top_p)
        return (dcache, nxt), (nxt, logits[:, 0])

    (dcache, _), (drafts, dlogits) = jax.lax.scan(draft_one, (st.dcache, st.cur), jnp.arange(k + 1))
    drafts, dlogits = drafts[:k].T, jnp.swapaxes(dlogits[:k], 0, 1)            # (B,k), (B,k,V)
    seq = jnp.concatenate([st.cur[:, None], drafts], axis=1)                   # (B,k+1)
    tlogits, tcache = decode(tparams, tspec, st.tcache, seq)                   # (B,k+1,V)

    # acceptance: greedy compares argmaxes; sampling uses u * q(d) < p(d)  <=>  u < p(d)/q(d)
    targmax = jnp.argmax(tlogits, axis=-1).astype(jnp.int32)
    p = token_probs(tlogits, temp, top_k, top_p)
    q = token_probs(dlogits, temp, top_k, top_p)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_fold(base, k + 1))
    match = jnp.where(temp <= 0, drafts == targmax[:, :k], u * q_d < p_d)
    n_acc = jnp.cumprod(match.astype(jnp.int32), axis=1).sum(axis=1)          # (B,) in 0..k

    p_n = p[rows, n_acc]
    q_n = jnp.where((n_acc < k)[:, None], q[rows, jnp.minimum(n_acc, k - 1)], 0.0)
    resid = jnp.maximum(p_n - q_n, 0.0)
    resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p_n)
    sampled = jax.vmap(jax.random.categorical)(_fold(base, k + 2), jnp.log(resid)).astype(jnp.int32)
    nxt = jnp.where(temp <= 0, targmax[rows, n_acc], sampled)

    # emitted tokens: d1..dn then nxt, cut after a stop token and at the token budget
    j = jnp.arange(k + 1)[None]
    emitted = jnp.where(j < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
    count = n_acc + 1
    is_stop = (emitted[..., None] == cfg.stop_tokens).any(-1) & (j < count[:, None])
    stopped = is_stop.any(-1)
    count = jnp.where(stopped, jnp.argmax(is_stop, axis=-1) + 1, count)
    count = jnp.minimum(count, cfg.max_tokens - st.n_out)
    slot = jnp.where((j < count[:, None]) & active[:, None], st.n_out[:, None] + j, N)
    out = st.out.at[rows[:, None], slot].set(emitted, mode="drop")
    n_out = st.n_out + jnp.where(active, count, 0)

    pos = st.tcache.pos + 1 + n_acc
    last_kept = seq[rows, n_acc]
    tcache = _rollback(tparams, tspec, tcache, st.tcache, pos, last_kept, active)
    dcache = _rollback(dparams, dspec, dcache, st.dcache, pos, last_kept, active)
    no_room = pos + k + 1 > st.tcache.max_len
    done = st.done | (active & (stopped | (n_out >= cfg.max_tokens) | no_room))
    return SpecState(tcache=tcache, dcache=dcache, cur=jnp.where(active, nxt, st.cur), out=out, n_out=n_out,
                     done=done, row_key=st.row_key, steps=st.steps + 1)


class SpeculativeDecoder:
    """Owns the jitted speculative loop of an Engine (compiled once per batch bucket and max_len)."""

    def __init__(self, engine, draft, k: int):
        if k < 1:
            raise ValueError(f"spec_k={k} must be >= 1 (draft tokens proposed per target forward)")
        self.engine, self.draft, self.k = engine, draft, k
        counts, tspec, dspec, max_len = engine.compile_counts, engine.spec, draft.spec, engine.max_len

        def _prefill(tparams, dparams, idx, lens, row_src, seed):
            counts["spec_prefill"] += 1
            tcache, _ = prefill(tparams, tspec, max_len, idx, lens, row_src)
            dcache, _ = prefill(dparams, dspec, max_len, idx, lens, row_src)
            return tcache, dcache, row_keys(seed, row_src.shape[0])

        def _segment(tparams, dparams, st, cfg):
            counts["speculative"] += 1
            return jax.lax.while_loop(lambda s: jnp.any(~s.done),
                                      lambda s: speculative_step(tparams, tspec, dparams, dspec, k, s, cfg), st)

        self._prefill = jax.jit(_prefill)
        self._segment = jax.jit(_segment, donate_argnums=(2,))
        self.last_target_forwards = 0     # loop iterations of the last generate (one target forward each)

    def generate(self, prompts: list[list[int]], num_samples: int, cfg, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (out (B,N), n_out (B,)) for the rows of `prompts` x num_samples (plus bucket padding)."""
        eng = self.engine
        eng._check_prompts(prompts, reserve=self.k + 1)
        # the caches hold all but the last prompt token, which the first step feeds as `cur`
        idx, lens, row_src = eng._pad_prompts([p[:-1] or p for p in prompts], num_samples)
        lens = np.array([len(p) - 1 for p in prompts] + [0] * (len(lens) - len(prompts)), np.int32)
        B, N = len(row_src), eng.max_len
        n_rows = len(prompts) * num_samples
        tparams = inference_params(eng.model.param_tree(), eng.spec)
        dparams = inference_params(self.draft.param_tree(), self.draft.spec)
        tcache, dcache, keys = self._prefill(tparams, dparams, idx, lens, row_src, np.int32(seed))
        cur = np.zeros(B, np.int32)
        cur[:n_rows] = np.repeat([p[-1] for p in prompts], num_samples)
        st = SpecState(tcache=tcache, dcache=dcache, cur=jnp.asarray(cur), out=jnp.zeros((B, N), jnp.int32),
                       n_out=jnp.zeros(B, jnp.int32), done=jnp.asarray(np.arange(B) >= n_rows), row_key=keys,
                       steps=jnp.zeros((), jnp.int32))
        st = self._segment(tparams, dparams, st, cfg)
        self.last_target_forwards = int(st.steps)
        return np.asarray(st.out), np.asarray(st.n_out)
