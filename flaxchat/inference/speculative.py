"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Per iteration of one compiled `lax.while_loop` (per row, rows are independent):
  both caches hold the sequence except its last token `cur`;
  draft:  feed cur, d1, ..., dk one at a time (k+1 tiny forwards, one `lax.scan`), sampling d1..dk
          from q1..qk (the (k+1)-th forward only writes dk into the draft cache, so both caches stay
          in step);
  target: one forward of [cur, d1..dk] (T = k+1) -> p1..p(k+1);
  accept: greedy: while d_i == argmax p_i; sampling: d_i with probability min(1, p_i(d_i)/q_i(d_i))
          (Leviathan et al. 2023), which leaves the target's distribution exactly unchanged;
  next:   greedy: argmax p(n+1); sampling: from norm(max(0, p(n+1) - q(n+1))) after a rejection,
          from p(k+1) when all k were accepted;
  emit d1..dn, next -- cut after a stop token, after a `<|python_end|>` that closes a block (the
          host runs the tool, as in the plain engine) and at the token budget; roll both caches back
          by setting pos = old + emitted (stale entries beyond are overwritten before anything can
          attend to them) and re-deriving prev_embed (the smear input) from the last kept token.
Tool outputs: the engine's forced queue (the same host-side tool serving as `Engine.generate`) is
consumed as proposals that are accepted unconditionally: forced tokens replace the draft's own
samples in the draft scan, so they enter both caches through the normal path, are verified in the
same target forward as ordinary drafts, and are marked forced. The token after the last forced one
is the target's own choice (its logits condition on the whole forced output).
Near the end of the cache (the engine's cache bucket: prompt + max_tokens rounded up, at most
max_len) the k+1-token forwards may run past it: those writes are dropped (kv_cache), and the walk
stops emission when prompt + output fills the cache, as the plain engine does; the logits it used
all come from positions inside the cache.
Under greedy decoding the tokens are therefore exactly the target's own greedy tokens, with or
without tool calls (tests/test_speculative.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.inference.engine import loop_compiler_options, params_preparer, prefill, row_keys, stream_window
from flaxchat.model.kv_cache import KVCache, decode
from flaxchat.model.gpt import ModelSpec, embed_tokens
from flaxchat.inference.sampling import draw, sample_tokens, token_probs


class SpecState(NamedTuple):
    tcache: KVCache
    dcache: KVCache
    cur: jax.Array        # (B,) last emitted token (or the prompt's last), in neither cache yet
    out: jax.Array        # (B,N) i32 generated tokens
    forced: jax.Array     # (B,N) i32 1 = forced (tool output)
    n_out: jax.Array      # (B,)
    done: jax.Array       # (B,)
    queue: jax.Array      # (B,Q) forced tokens waiting      } the tool fields, as in
    q_head: jax.Array     # (B,)                             } engine.DecodeState: the engine's
    q_len: jax.Array      # (B,)                             } host-side tool serving works on
    in_py: jax.Array      # (B,) inside a python block       } both states unchanged
    py_start: jax.Array   # (B,)
    needs_tool: jax.Array  # (B,)
    row_key: jax.Array    # (B,2)
    steer: jax.Array      # (B,N) test hook: the target's choice at output index n, -1 = its own
    steps: jax.Array      # () target forwards so far (for acceptance statistics)


def _fold(keys: jax.Array, i: int | jax.Array) -> jax.Array:
    return jax.vmap(lambda key: jax.random.fold_in(key, i))(keys)


def _rollback(params: dict, spec: ModelSpec, new: KVCache, old: KVCache, pos: jax.Array, last: jax.Array,
              active: jax.Array) -> KVCache:
    prev = embed_tokens(params, spec, last[:, None])[:, 0].astype(old.prev_embed.dtype)
    return new._replace(pos=jnp.where(active, pos, old.pos), prev_embed=jnp.where(active[:, None], prev, old.prev_embed))


def _draft(dparams: dict, dspec: ModelSpec, st: SpecState, base: jax.Array, fmask: jax.Array, ftok: jax.Array,
           k: int, cfg) -> tuple[jax.Array, jax.Array, KVCache]:
    """k proposals (B,k) with the draft's logits (B,k,V) and its cache after cur, d1..dk. Proposal i is
    the forced token i when one is waiting (fmask (B,k+1)), else the draft's sample.
    Both loops (k+1 steps, the draft's layers) are unrolled: a small model's forward is cheaper than
    a loop trip on GPU, where each while-loop iteration waits for its predicate on the host (the
    layers are always unrolled: flaxchat.model.kv_cache)."""
    def one(carry, x):
        dcache, tok = carry
        i, f_on, f_tok = x
        logits, dcache = decode(dparams, dspec, dcache, tok[:, None])
        nxt = sample_tokens(logits[:, 0], _fold(base, i), cfg.temperature, cfg.top_k, cfg.top_p)
        return (dcache, jnp.where(f_on, f_tok, nxt)), (jnp.where(f_on, f_tok, nxt), logits[:, 0])

    (dcache, _), (props, dlogits) = jax.lax.scan(one, (st.dcache, st.cur), (jnp.arange(k + 1), fmask.T, ftok.T),
                                                 unroll=True)
    return props[:k].T, jnp.swapaxes(dlogits[:k], 0, 1), dcache


def _accept(tlogits, dlogits, drafts, fmask, ftok, steer, base, k: int, cfg) -> tuple[jax.Array, jax.Array]:
    """-> (n_acc (B,) accepted proposals, next token (B,)). Forced proposals are always accepted;
    a steered position (test hook) accepts only the steered token, which is then also `next`."""
    B = drafts.shape[0]
    rows = jnp.arange(B)
    temp, top_k, top_p = cfg.temperature, cfg.top_k, cfg.top_p
    targmax = jnp.argmax(tlogits, axis=-1).astype(jnp.int32)                    # (B,k+1)
    p = token_probs(tlogits, temp, top_k, top_p)
    q = token_probs(dlogits, temp, top_k, top_p)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_fold(base, k + 1))
    own = jnp.where(temp <= 0, drafts == targmax[:, :k], u * q_d < p_d)      # u < p/q without dividing
    steered = steer[:, :k] >= 0
    match = fmask[:, :k] | jnp.where(steered, drafts == steer[:, :k], own)
    n_acc = jnp.cumprod(match.astype(jnp.int32), axis=1).sum(axis=1)           # (B,) in 0..k

    p_n = p[rows, n_acc]
    q_n = jnp.where((n_acc < k)[:, None], q[rows, jnp.minimum(n_acc, k - 1)], 0.0)
    resid = jnp.maximum(p_n - q_n, 0.0)
    resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p_n)
    sampled = draw(resid, jax.vmap(lambda key: jax.random.uniform(key, ()))(_fold(base, k + 2)))
    nxt = jnp.where(temp <= 0, targmax[rows, n_acc], sampled)
    nxt = jnp.where(steer[rows, n_acc] >= 0, steer[rows, n_acc], nxt)
    return n_acc, jnp.where(fmask[rows, n_acc], ftok[rows, n_acc], nxt)


def _walk(emitted, n_emit, st: SpecState, specials: dict[str, int], cfg):
    """The plain engine's per-token bookkeeping over this iteration's (B,k+1) emitted tokens: python
    block state, and where emission ends (after a stop token, after a closing <|python_end|> when
    tools are on, at max_tokens, when prompt + output fills the cache: it holds all but `cur`, so
    that is pos + 1 + count). -> (count, in_py, py_start, stopped, tool_call)."""
    B = emitted.shape[0]
    start, end = specials["<|python_start|>"], specials["<|python_end|>"]

    def one(carry, x):
        alive, count, in_py, py_start, stopped, tool = carry
        j, tok = x
        valid = alive & (j < n_emit)
        opens = valid & (tok == start)
        closes = valid & (tok == end) & in_py
        in_py = jnp.where(valid, (in_py | opens) & ~closes, in_py)
        count = count + valid
        py_start = jnp.where(opens, st.n_out + count, py_start)
        stop = valid & (tok[:, None] == cfg.stop_tokens[None]).any(-1)
        call = closes & cfg.use_tools
        room = st.tcache.pos + 1 + count < st.tcache.max_len
        alive = valid & ~stop & ~call & (st.n_out + count < cfg.max_tokens) & room
        return (alive, count, in_py, py_start, stopped | stop, tool | call), None

    init = (~st.done, jnp.zeros(B, jnp.int32), st.in_py, st.py_start, jnp.zeros(B, bool), jnp.zeros(B, bool))
    (_, count, in_py, py_start, stopped, tool), _ = jax.lax.scan(
        one, init, (jnp.arange(emitted.shape[1]), emitted.T), unroll=True)
    return count, in_py, py_start, stopped, tool


def speculative_step(tparams: dict, tspec: ModelSpec, dparams: dict, dspec: ModelSpec, specials: dict[str, int],
                     k: int, st: SpecState, cfg) -> SpecState:
    B, N = st.out.shape
    Q = st.queue.shape[1]
    rows = jnp.arange(B)
    active = ~st.done
    base = jax.vmap(jax.random.fold_in)(st.row_key, st.n_out)
    j = jnp.arange(k + 1)[None]                                                # (1,k+1)
    f_idx = st.q_head[:, None] + j
    fmask = f_idx < st.q_len[:, None]                                          # forced token waiting at j
    ftok = st.queue[rows[:, None], jnp.minimum(f_idx, Q - 1)]
    steer = st.steer[rows[:, None], jnp.minimum(st.n_out[:, None] + j, N - 1)]

    drafts, dlogits, dcache = _draft(dparams, dspec, st, base, fmask, ftok, k, cfg)
    seq = jnp.concatenate([st.cur[:, None], drafts], axis=1)                   # (B,k+1)
    tlogits, tcache = decode(tparams, tspec, st.tcache, seq)                   # (B,k+1,V)
    n_acc, nxt = _accept(tlogits, dlogits, drafts, fmask, ftok, steer, base, k, cfg)

    # emitted: d1..dn then nxt, then cut by the bookkeeping walk
    emitted = jnp.where(j < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
    count, in_py, py_start, stopped, tool = _walk(emitted, n_acc + 1, st, specials, cfg)
    keep = (j < count[:, None]) & active[:, None]
    slot = jnp.where(keep, st.n_out[:, None] + j, N)
    out = st.out.at[rows[:, None], slot].set(emitted, mode="drop")
    forced = st.forced.at[rows[:, None], slot].set(fmask.astype(jnp.int32), mode="drop")
    n_out = st.n_out + jnp.where(active, count, 0)
    q_head = st.q_head + (fmask & keep).sum(axis=1)

    # the caches keep cur and the emitted tokens but the last, which becomes the next cur
    last = jnp.maximum(count - 1, 0)
    pos = st.tcache.pos + count
    tcache = _rollback(tparams, tspec, tcache, st.tcache, pos, seq[rows, last], active)
    dcache = _rollback(dparams, dspec, dcache, st.dcache, pos, seq[rows, last], active)
    full = pos + 1 >= st.tcache.max_len
    done = st.done | (active & (stopped | (n_out >= cfg.max_tokens) | full))
    return st._replace(
        tcache=tcache, dcache=dcache, cur=jnp.where(active, emitted[rows, last], st.cur), out=out, forced=forced,
        n_out=n_out, done=done, q_head=q_head, in_py=jnp.where(active, in_py, st.in_py),
        py_start=jnp.where(active, py_start, st.py_start), needs_tool=st.needs_tool | (active & tool & ~done),
        steps=st.steps + 1)


class SpeculativeDecoder:
    """Owns the jitted speculative loop of an Engine (compiled once per batch bucket and cache bucket).
    `Engine.generate` drives it like its own loop: start -> segment until no row waits for a tool;
    `Engine.stream` calls `step` (one iteration) and yields what each iteration emitted."""

    def __init__(self, engine, draft, k: int):
        if k < 1:
            raise ValueError(f"spec_k={k} must be >= 1 (draft tokens proposed per target forward)")
        self.engine, self.draft, self.k = engine, draft, k
        counts, tspec, dspec = engine.compile_counts, engine.spec, draft.spec
        specials = engine.specials

        def _prefill(tparams, dparams, idx, lens, row_src, seed, cache_len):
            counts["spec_prefill"] += 1
            tcache, _ = prefill(tparams, tspec, cache_len, idx, lens, row_src)
            dcache, _ = prefill(dparams, dspec, cache_len, idx, lens, row_src)
            return tcache, dcache, row_keys(seed, row_src.shape[0])

        def _segment(params, st, cfg):
            counts["speculative"] += 1
            tparams, dparams = params
            return jax.lax.while_loop(
                lambda s: jnp.any(~s.done) & ~jnp.any(s.needs_tool),
                lambda s: speculative_step(tparams, tspec, dparams, dspec, specials, k, s, cfg), st)

        def _step(params, st, cfg):
            counts["spec_step"] += 1
            new = speculative_step(params[0], tspec, params[1], dspec, specials, k, st, cfg)
            return stream_window(st, new, k + 1)

        self._prefill = jax.jit(_prefill, static_argnums=(6,))
        self._prepare_draft = params_preparer(dspec)
        self.segment = jax.jit(_segment, donate_argnums=(1,), compiler_options=loop_compiler_options())
        self.step = jax.jit(_step, donate_argnums=(1,), compiler_options=loop_compiler_options())   # for Engine.stream
        self.last_target_forwards = 0     # loop iterations of the last generate (one target forward each)

    def params(self) -> tuple[dict, dict]:
        return self.engine.prepare(self.engine.model.param_tree()), self._prepare_draft(self.draft.param_tree())

    def start(self, params: tuple[dict, dict], prompts: list[list[int]], num_samples: int, seed: int, steer_rows,
              use_tools: bool, cache_len: int):
        """-> (SpecState, per-row prompt-opened python expressions) for prompts x num_samples, both
        caches with cache_len slots (Engine._cache_len, which also checked the prompts)."""
        eng = self.engine
        # the caches hold all but the last prompt token, which the first step feeds as `cur`
        idx, _, row_src = eng._pad_prompts([p[:-1] or p for p in prompts], num_samples, cache_len)
        lens = np.zeros(len(idx), np.int32)
        lens[:len(prompts)] = [len(p) - 1 for p in prompts]
        B, N = len(row_src), cache_len
        n_rows = len(prompts) * num_samples
        tparams, dparams = params
        tcache, dcache, keys = self._prefill(tparams, dparams, idx, lens, row_src, np.int32(seed), cache_len)
        tools, prefixes = eng._tool_start(prompts, num_samples, B, N, steer_rows, use_tools)
        cur = np.zeros(B, np.int32)
        cur[:n_rows] = np.repeat([p[-1] for p in prompts], num_samples)
        st = SpecState(tcache=tcache, dcache=dcache, cur=cur, out=np.zeros((B, N), np.int32),
                       forced=np.zeros((B, N), np.int32), n_out=np.zeros(B, np.int32), done=np.arange(B) >= n_rows,
                       row_key=keys, steps=np.zeros((), np.int32), **tools)
        return jax.tree.map(jnp.asarray, st), prefixes
