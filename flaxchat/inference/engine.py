"""Batched inference with tool use: nanochat's Engine, with the token loop compiled by XLA.

Shape of a call (`Engine.generate`):
  1. Host: each prompt is repeated num_samples times; rows are padded to a power-of-two batch
     bucket (dummy rows start finished) and prompts to a power-of-two length bucket. The KV cache
     gets a *cache bucket* of slots: the smallest of 64, 96, 128, 192, 256, ... (2^k and 3*2^(k-1))
     that holds the longest prompt + max_tokens, capped at the engine's max_len (`cache_bucket`).
     Every decode step attends over all cache slots, so a cache sized to the model's sequence_len
     made a short request pay for slots it never fills (32 + 128 tokens attended over 512 slots,
     now 192); the buckets keep the number of compiles to a handful per batch bucket.
  2. One jitted prefill runs the distinct prompts through the model in a single forward (right
     padded; each row's cache `pos` is its own prompt length, so padding is never attended: a slot
     beyond `pos` is overwritten before any query can see it), then gathers cache rows per sample.
  3. A jitted *segment* (`lax.while_loop`, model params passed as arguments, their layers split
     once per call by `kv_cache.prepare_params`) picks one token per row per iteration, writes it
     to a (B, cache bucket) output buffer and feeds it back through `kv_cache.decode`. It is
     compiled once per (batch bucket, cache bucket): temperature, top-k, top-p, max_tokens, the
     seed and the stop tokens are all traced values.
  4. Tool use (nanochat's protocol). A segment returns to the host as soon as any row closes a
     python block (or every row is finished). The host decodes that row's expression, runs it in
     the calculator, or in the sandbox when the calculator refuses it, and writes
     <|output_start|> result <|output_end|> into the row's *forced queue* (B, Q). The next segment
     takes tokens from a row's queue before sampling again and marks them forced=1 (RL must not
     train on them). Other rows just continue; nothing is recompiled.
`Engine.stream` runs the same body one iteration per jitted call (compiled once per bucket) and
yields each token as it is decoded, tool outputs included (with a draft: the tokens of each
speculative iteration as soon as it is verified).

Sampling keys are fold_in(fold_in(seed, row), token index), so a row's tokens do not depend on the
other rows in the batch or on where tool calls interrupted the loop. With `draft` set, greedy and
sampled generation and streaming run speculatively (flaxchat.inference.speculative), tool calls included.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxchat.model.kv_cache import KVCache, decode, init_cache, prepare_params
from flaxchat.model.gpt import ModelSpec, embed_tokens
from flaxchat.inference.sampling import sample_tokens
from flaxchat.inference.tools import run_tool  # engine_mod.run_tool: bench/grpo_bench.py wraps it

MAX_STOP_TOKENS = 8        # stop-token list is padded to this (a fixed shape: no recompiles)
MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64      # smallest KV cache (slots); below this a step's attention is noise


class EngineError(ValueError):
    """A generate/stream request the engine cannot serve; the message names the fix."""


@dataclasses.dataclass
class Completion:
    tokens: list[int]      # generated tokens (prompt excluded), the stop token included when finished
    forced: list[int]      # 1 where the engine forced the token (tool output), 0 where it was sampled
    text: str              # tokens decoded, the final stop token left out
    finished: bool         # ended on a stop token (False: max_tokens or max_len ran out)


class Settings(NamedTuple):
    """Per-call sampling settings, all traced (changing them never recompiles)."""
    temperature: jax.Array     # () f32
    top_k: jax.Array           # () i32, 0 = off
    top_p: jax.Array           # () f32, 1 = off
    max_tokens: jax.Array      # () i32
    stop_tokens: jax.Array     # (MAX_STOP_TOKENS,) i32, -1 padded
    use_tools: jax.Array       # () bool


class DecodeState(NamedTuple):
    cache: KVCache
    logits: jax.Array          # (B,V) f32: next-token logits of each row
    out: jax.Array             # (B,N) i32 generated tokens
    forced: jax.Array          # (B,N) i32 1 = forced
    n_out: jax.Array           # (B,) tokens generated so far
    done: jax.Array            # (B,) bool
    queue: jax.Array           # (B,Q) forced tokens waiting
    q_head: jax.Array          # (B,) next queue index
    q_len: jax.Array           # (B,) queue fill
    in_py: jax.Array           # (B,) inside a python block
    py_start: jax.Array        # (B,) out index of the block's first expression token
    needs_tool: jax.Array      # (B,) closed a python block; the host must serve it
    row_key: jax.Array         # (B,2) raw PRNG key per row
    steer: jax.Array           # (B,N) test hook: token to emit *as sampled* at index n, -1 = none


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def cache_bucket(need: int, max_len: int) -> int:
    """KV cache slots for a request that needs `need`: the smallest 2^k or 3*2^(k-1) >= need (and >=
    MIN_CACHE_BUCKET), or max_len when that is smaller. Two buckets per octave: at most ~1.5x the
    slots a request needs, and ~2*log2(max_len/64) distinct compiles per batch bucket."""
    size = next_pow2(need, MIN_CACHE_BUCKET)
    if size > MIN_CACHE_BUCKET and size * 3 // 4 >= need:
        size = size * 3 // 4
    return min(size, max_len)


def prefill(params: dict, spec: ModelSpec, cache_len: int, idx: jax.Array, lens: jax.Array,
            row_src: jax.Array) -> tuple[KVCache, jax.Array]:
    """Right-padded prompts idx (P,Lp) with lengths lens (P,) -> (cache of B=len(row_src) rows with
    cache_len slots, next-token logits (B,V)); row b is prompt row_src[b]. Rows with lens 0 are
    allowed (their logits are meaningless)."""
    P = idx.shape[0]
    last = jnp.maximum(lens - 1, 0)
    logits, cache = decode(params, spec, init_cache(spec, P, cache_len), idx, logits_at=last)    # (P,V)
    prev = embed_tokens(params, spec, idx[jnp.arange(P), last][:, None])[:, 0]
    cache = KVCache(keys=tuple(k[row_src] for k in cache.keys), values=tuple(v[row_src] for v in cache.values),
                    pos=lens[row_src].astype(jnp.int32), prev_embed=prev[row_src].astype(cache.prev_embed.dtype))
    return cache, logits[row_src]


def inference_params(params: dict, spec: ModelSpec) -> dict:
    """The params a decode loop takes, made once per call: matrices and embedding tables cast to the
    compute dtype, so each step reads bf16 instead of fp32 masters (the model casts every one of
    them before use anyway, so the result is identical; fp32 scalars and per-layer lambdas are left
    alone), and the layers split out of the stacked blocks (`kv_cache.prepare_params`: slicing the
    stack inside the loop would copy every layer's weights every step)."""
    return prepare_params(jax.tree.map(lambda x: x.astype(spec.dtype) if x.ndim >= 2 else x, params), spec)


TABLES = ("wte", "lm_head", "value_embeds")    # the big top-level matrices, read as they are when in the compute dtype


def params_preparer(spec: ModelSpec, on_compile=lambda: None):
    """`inference_params` for `spec` as a function of the param tree, with the jit kept to what it
    changes: a table already in the compute dtype (all of them on CPU, fp32) bypasses the jit and is
    returned as the very same array. Every output of a jitted function is a fresh buffer, so a jit
    over the whole tree copied the 250 MB of embedding and head tables of the runcpu model on every
    generate call (14 of its ~360 ms at batch 1). `on_compile` is called when the jit traces."""
    def split(rest):
        on_compile()
        return inference_params(rest, spec)

    jitted = jax.jit(split)

    def prepare(params: dict) -> dict:
        kept = {k: params[k] for k in TABLES if k in params and params[k].dtype == spec.dtype}
        return {**jitted({k: v for k, v in params.items() if k not in kept}), **kept}

    return prepare


def loop_compiler_options(backend: str | None = None) -> dict[str, bool]:
    """XLA options for the compiled token loops. On CPU: copy insertion with region analysis.
    Without it, XLA:CPU copied every layer's loop-carried K and V cache on every step of a
    batch-1 decode (it could not prove that the step's attention reads of a cache come before the
    cache's in-place update, and copied instead of ordering them; batch 2 and up got no copies).
    With it: no cache copies, +3% tok/s at batch 1 on the runcpu model (median of 7 interleaved
    pairs; 8 rows and the train step unchanged). Other backends: none."""
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if (backend or jax.default_backend()) == "cpu" else {}


def row_keys(seed: jax.Array, n_rows: int) -> jax.Array:
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(seed), r))(jnp.arange(n_rows))


def decode_step(params: dict, spec: ModelSpec, specials: dict[str, int], st: DecodeState,
                cfg: Settings) -> DecodeState:
    """One token for every unfinished row: queue > steer > sample; then the tool state machine and
    the model forward of that token."""
    B, N = st.out.shape
    Q = st.queue.shape[1]
    rows = jnp.arange(B)
    active = ~st.done
    keys = jax.vmap(jax.random.fold_in)(st.row_key, st.n_out)
    sampled = sample_tokens(st.logits, keys, cfg.temperature, cfg.top_k, cfg.top_p)
    steer = st.steer[rows, jnp.minimum(st.n_out, N - 1)]
    sampled = jnp.where(steer >= 0, steer, sampled)
    has_forced = st.q_head < st.q_len
    tok = jnp.where(has_forced, st.queue[rows, jnp.minimum(st.q_head, Q - 1)], sampled)
    tok = jnp.where(active, tok, 0)
    slot = jnp.where(active, st.n_out, N)                       # N: dropped
    out = st.out.at[rows, slot].set(tok, mode="drop")
    forced = st.forced.at[rows, slot].set(has_forced.astype(jnp.int32), mode="drop")
    n_out = st.n_out + active
    q_head = st.q_head + (active & has_forced)

    opens = active & (tok == specials["<|python_start|>"])
    closes = active & (tok == specials["<|python_end|>"]) & st.in_py
    in_py = (st.in_py | opens) & ~closes
    py_start = jnp.where(opens, n_out, st.py_start)

    logits, cache = decode(params, spec, st.cache, tok[:, None])
    # finished rows keep their position (their garbage write lands beyond pos and is never read)
    cache = cache._replace(pos=jnp.where(active, cache.pos, st.cache.pos),
                           prev_embed=jnp.where(active[:, None], cache.prev_embed, st.cache.prev_embed))
    is_stop = (tok[:, None] == cfg.stop_tokens[None]).any(-1)
    done = st.done | (active & (is_stop | (n_out >= cfg.max_tokens) | (cache.pos >= cache.max_len)))
    needs_tool = st.needs_tool | (closes & ~done & cfg.use_tools)
    return st._replace(cache=cache, logits=logits[:, 0], out=out, forced=forced, n_out=n_out, done=done,
                       q_head=q_head, in_py=in_py, py_start=py_start, needs_tool=needs_tool)


def run_segment(params: dict, spec: ModelSpec, specials: dict[str, int], st: DecodeState,
                cfg: Settings) -> DecodeState:
    """Decode until every row is finished or some row waits for a tool."""
    def cond(s: DecodeState) -> jax.Array:
        return jnp.any(~s.done) & ~jnp.any(s.needs_tool)
    return jax.lax.while_loop(cond, lambda s: decode_step(params, spec, specials, s, cfg), st)


def stream_window(old, new, width: int) -> tuple:
    """(new state, the up to `width` tokens row 0 emitted in this step (W,), how many) for `stream`:
    one small fixed-shape transfer per step instead of the whole output buffer."""
    idx = jnp.minimum(old.n_out[0] + jnp.arange(width), new.out.shape[1] - 1)
    return new, new.out[0, idx], new.n_out[0] - old.n_out[0]


class Engine:
    """Generation for a GPT (`flaxchat.model.gpt.GPT`) and its tokenizer. See the module docstring."""

    def __init__(self, model, tokenizer, *, max_len: int | None = None, draft=None, spec_k: int = 4,
                 max_tool_tokens: int = 64, bucket_cache: bool = True):
        """max_len: the most tokens (prompt + output) a row may hold, default the model's
        sequence_len. bucket_cache=False sizes every cache to max_len (the behaviour before cache
        buckets; slower, kept for comparisons)."""
        self.model, self.tokenizer, self.draft, self.spec_k = model, tokenizer, draft, spec_k
        self.spec: ModelSpec = model.spec
        self.max_len = int(max_len or self.spec.sequence_len)
        self.bucket_cache = bucket_cache
        self.last_cache_len = 0           # cache slots of the last generate/stream call (for benchmarks)
        self.queue_len = max_tool_tokens + 2
        self.specials = dict(tokenizer.special_tokens)
        if draft is not None and draft.spec.vocab_size != self.spec.vocab_size:
            raise EngineError(f"draft vocab {draft.spec.vocab_size} != target vocab {self.spec.vocab_size}: "
                              "the draft must share the target's tokenizer")
        self.compile_counts: Counter[str] = Counter()
        spec, specials = self.spec, self.specials

        def _prefill(params, idx, lens, row_src, seed, cache_len):
            self.compile_counts["prefill"] += 1
            cache, logits = prefill(params, spec, cache_len, idx, lens, row_src)
            return cache, logits, row_keys(seed, row_src.shape[0])

        def _segment(params, st, cfg):
            self.compile_counts["segment"] += 1
            return run_segment(params, spec, specials, st, cfg)

        def _step(params, st, cfg):
            self.compile_counts["step"] += 1
            return stream_window(st, decode_step(params, spec, specials, st, cfg), 1)

        def _inject(st, queue, q_len, served):
            self.compile_counts["inject"] += 1
            return st._replace(queue=jnp.where(served[:, None], queue, st.queue),
                               q_head=jnp.where(served, 0, st.q_head), q_len=jnp.where(served, q_len, st.q_len),
                               needs_tool=st.needs_tool & ~served)

        self._prefill = jax.jit(_prefill, static_argnums=(5,))
        # param tree -> inference_params (the layer split and any casts; tables in the compute dtype as they are)
        self.prepare = params_preparer(spec, lambda: self.compile_counts.update(["params"]))
        self._segment = jax.jit(_segment, donate_argnums=(1,), compiler_options=loop_compiler_options())
        self._step = jax.jit(_step, donate_argnums=(1,), compiler_options=loop_compiler_options())
        self._inject = jax.jit(_inject, donate_argnums=(0,))
        self._speculative = None
        if draft is not None:
            from flaxchat.inference.speculative import SpeculativeDecoder
            self._speculative = SpeculativeDecoder(self, draft, spec_k)

    @property
    def compile_count(self) -> int:
        """Compilations of the token loops (generate segment, stream step, speculative segment)."""
        return sum(self.compile_counts[k] for k in ("segment", "step", "speculative", "spec_step"))

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], *, num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 use_tools: bool = True, stop_tokens: list[int] | None = None,
                 _steer: list[list[int]] | None = None) -> list[list[Completion]]:
        """num_samples completions of each prompt. `_steer` (tests only): per-row tokens emitted as
        if sampled at indices 0.. (-1 = sample), to drive the tool protocol deterministically."""
        cfg = self._settings(max_tokens, temperature, top_k, top_p, use_tools, stop_tokens)
        n_rows = len(prompts) * num_samples
        cache_len = self._cache_len(prompts, max_tokens)
        if self._speculative is not None:
            params, segment = self._speculative.params(), self._speculative.segment
            st, prefixes = self._speculative.start(params, prompts, num_samples, seed, _steer, use_tools, cache_len)
        else:
            params, segment = self.prepare(self.model.param_tree()), self._segment
            st, prefixes = self._start(params, prompts, num_samples, seed, _steer, use_tools, cache_len)
        while True:
            st = segment(params, st, cfg)
            needs = np.asarray(st.needs_tool)
            if not needs.any():
                break
            st = self._serve_tools(st, needs, prefixes)
        if self._speculative is not None:
            self._speculative.last_target_forwards = int(st.steps)
        out, forced, n_out = np.asarray(st.out), np.asarray(st.forced), np.asarray(st.n_out)
        stops = set(np.asarray(cfg.stop_tokens).tolist()) - {-1}
        done = [self._completion(out[r, :n_out[r]], forced[r, :n_out[r]], stops) for r in range(n_rows)]
        return [done[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]

    def stream(self, prompt: list[int], *, num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_tools: bool = True,
               stop_tokens: list[int] | None = None) -> Iterator[int]:
        """Yield token ids as they are decoded (tool outputs too; the final stop token included)."""
        if num_samples != 1:
            raise EngineError(f"stream yields one row of tokens: num_samples must be 1, got {num_samples}")
        cfg = self._settings(max_tokens, temperature, top_k, top_p, use_tools, stop_tokens)
        cache_len = self._cache_len([prompt], max_tokens)
        if self._speculative is not None:
            params, step = self._speculative.params(), self._speculative.step
            st, prefixes = self._speculative.start(params, [prompt], 1, seed, None, use_tools, cache_len)
        else:
            params, step = self.prepare(self.model.param_tree()), self._step
            st, prefixes = self._start(params, [prompt], 1, seed, None, use_tools, cache_len)
        while True:
            st, window, count = step(params, st, cfg)
            done, window, count, needs = jax.device_get((st.done[0], window, count, st.needs_tool))
            yield from (int(t) for t in window[:count])
            if needs.any():
                st = self._serve_tools(st, needs, prefixes)
            if done:
                return

    # ------------------------------------------------------------------ internals
    def _settings(self, max_tokens, temperature, top_k, top_p, use_tools, stop_tokens) -> Settings:
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or max_tokens < 1:
            raise EngineError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1, max_tokens >= 1; got "
                              f"{temperature}, {top_k}, {top_p}, {max_tokens}")
        if stop_tokens is None:
            stop_tokens = [self.specials["<|assistant_end|>"], self.tokenizer.bos_token_id]
        if len(stop_tokens) > MAX_STOP_TOKENS:
            raise EngineError(f"{len(stop_tokens)} stop tokens; at most {MAX_STOP_TOKENS} are supported")
        stops = np.full(MAX_STOP_TOKENS, -1, np.int32)
        stops[:len(stop_tokens)] = stop_tokens
        return Settings(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.int32(max_tokens),
                        jnp.asarray(stops), jnp.bool_(use_tools))

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise EngineError("every prompt needs at least one token (start it with <|bos|>)")
        longest = max(len(p) for p in prompts)
        if longest + 1 > self.max_len:
            raise EngineError(f"a prompt of {longest} tokens leaves no room in max_len={self.max_len}: "
                              "shorten it or build the Engine with a larger max_len")

    def _cache_len(self, prompts: list[list[int]], max_tokens: int) -> int:
        """Cache slots for this request (module docstring, step 1); checks the prompts first."""
        self._check_prompts(prompts)
        need = max(len(p) for p in prompts) + max_tokens
        self.last_cache_len = cache_bucket(need, self.max_len) if self.bucket_cache else self.max_len
        return self.last_cache_len

    def _pad_prompts(self, prompts: list[list[int]], num_samples: int, cache_len: int) -> tuple[np.ndarray, ...]:
        """(idx (P,Lp), lens (P,), row_src (B,)) with power-of-two buckets; dummy rows copy prompt 0."""
        P = next_pow2(len(prompts))
        Lp = min(next_pow2(max(len(p) for p in prompts), MIN_PROMPT_BUCKET), cache_len)
        idx = np.zeros((P, Lp), np.int32)
        lens = np.zeros(P, np.int32)
        for i, p in enumerate(prompts):
            idx[i, :len(p)], lens[i] = p, len(p)
        n_rows = len(prompts) * num_samples
        row_src = np.zeros(next_pow2(n_rows), np.int32)
        row_src[:n_rows] = np.repeat(np.arange(len(prompts)), num_samples)
        return idx, lens, row_src

    def _start(self, params, prompts, num_samples, seed, steer_rows, use_tools,
               cache_len: int) -> tuple[DecodeState, list[list[int] | None]]:
        """The decode state after prefill; the output buffers have cache_len columns (a row can
        never emit more: its prompt already holds a slot)."""
        idx, lens, row_src = self._pad_prompts(prompts, num_samples, cache_len)
        B, N = len(row_src), cache_len
        n_rows = len(prompts) * num_samples
        cache, logits, keys = self._prefill(params, idx, lens, row_src, np.int32(seed), cache_len)
        tools, prefixes = self._tool_start(prompts, num_samples, B, N, steer_rows, use_tools)
        zeros = np.zeros(B, np.int32)
        st = DecodeState(cache=cache, logits=logits, out=np.zeros((B, N), np.int32), forced=np.zeros((B, N), np.int32),
                         n_out=zeros, done=np.arange(B) >= n_rows, row_key=keys, **tools)
        return jax.tree.map(jnp.asarray, st), prefixes

    def _tool_start(self, prompts, num_samples, B, N, steer_rows, use_tools) -> tuple[dict, list[list[int] | None]]:
        """The tool fields of a fresh decode state (queue, q_head, q_len, in_py, py_start, needs_tool,
        steer (B,N)) for B rows, and per row the expression opened in its prompt (or None)."""
        Q = self.queue_len
        queue, q_len = np.zeros((B, Q), np.int32), np.zeros(B, np.int32)
        in_py = np.zeros(B, bool)
        prefixes: list[list[int] | None] = [None] * B
        for r in range(len(prompts) * num_samples if use_tools else 0):
            state, tokens = self._prompt_tool_state(prompts[r // num_samples])
            if state == "open":             # the prompt ends inside a python block
                in_py[r], prefixes[r] = True, tokens
            elif state == "closed":         # the prompt ends with a complete block: serve it first
                forced = self._tool_tokens(tokens)
                queue[r, :len(forced)], q_len[r] = forced, len(forced)
        steer = np.full((B, N), -1, np.int32)
        for r, row in enumerate(steer_rows or []):
            steer[r, :len(row)] = row[:N]
        zeros = np.zeros(B, np.int32)
        return dict(queue=queue, q_head=zeros, q_len=q_len, in_py=in_py, py_start=zeros,
                    needs_tool=np.zeros(B, bool), steer=steer), prefixes

    def _prompt_tool_state(self, prompt: list[int]) -> tuple[str, list[int]]:
        """('open', expr so far) / ('closed', expr) / ('none', []) for the prompt's last python block."""
        start, end = self.specials["<|python_start|>"], self.specials["<|python_end|>"]
        if start not in prompt:
            return "none", []
        s = len(prompt) - 1 - prompt[::-1].index(start)
        body = prompt[s + 1:]
        if end not in body:
            return "open", body
        if body.index(end) == len(body) - 1:
            return "closed", body[:-1]
        return "none", []

    def _tool_tokens(self, expr_tokens: list[int]) -> list[int]:
        """<|output_start|> result <|output_end|> for an expression; [] for an empty block."""
        if not expr_tokens:
            return []
        result = self.tokenizer.encode(run_tool(self.tokenizer.decode(expr_tokens)))[:self.queue_len - 2]
        return [self.specials["<|output_start|>"], *result, self.specials["<|output_end|>"]]

    def _serve_tools(self, st: DecodeState, needs: np.ndarray, prefixes: list) -> DecodeState:
        out, n_out, py_start = jax.device_get((st.out, st.n_out, st.py_start))
        B, Q = st.queue.shape
        queue, q_len = np.zeros((B, Q), np.int32), np.zeros(B, np.int32)
        for r in np.flatnonzero(needs):
            expr = out[r, py_start[r]:n_out[r] - 1].tolist()       # python_end excluded
            if py_start[r] == 0 and prefixes[r] is not None:      # block opened in the prompt
                expr, prefixes[r] = prefixes[r] + expr, None
            forced = self._tool_tokens(expr)
            queue[r, :len(forced)], q_len[r] = forced, len(forced)
        return self._inject(st, jnp.asarray(queue), jnp.asarray(q_len), jnp.asarray(needs))

    def _completion(self, tokens: np.ndarray, forced: np.ndarray, stops: set[int]) -> Completion:
        tokens, forced = tokens.tolist(), forced.tolist()
        finished = bool(tokens) and tokens[-1] in stops and not forced[-1]
        return Completion(tokens=tokens, forced=forced, text=self.tokenizer.decode(tokens[:-1] if finished else tokens),
                          finished=finished)
