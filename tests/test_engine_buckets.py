"""Cache buckets (flaxchat.inference.engine.cache_bucket) and the decode loop's cache layout.

The engine sizes each request's KV cache to prompt + max_tokens rounded up to a bucket (2^k or
3*2^(k-1), at least 64, at most max_len) instead of max_len: checked here are the sizes chosen, that
the number of decode-loop compiles stays the number of buckets used, that greedy output (tool
calls included, and speculative decoding whose k+1-token forwards overrun a full cache) is the same
as with a max_len cache, that the compiled loop reads the per-layer caches and weights in place
(no per-step copy or transpose of a cache- or weight-shaped buffer: what cost ~1/3 of a step), and
that preparing the weights once per call does not copy the tables, and that the loop computes no
RoPE angles.
"""

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.inference.engine import MIN_CACHE_BUCKET, TABLES, Engine, cache_bucket, inference_params, params_preparer
from tiny_models import TinyModel, tiny_tokenizer

MAX_LEN = 256


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(with_sums=True)


@pytest.fixture(scope="module")
def model(tok):
    return TinyModel(tok.vocab_size)


def prompts_of(tok):
    bos = tok.bos_token_id
    return [[bos] + tok.encode("the cat sat on the mat"), [bos] + tok.encode("a dog"), [bos]]


def test_bucket_sizes():
    assert [cache_bucket(n, 512) for n in (1, 17, 64, 65, 96, 97, 129, 160, 193, 385, 600)] == \
        [64, 64, 64, 96, 96, 128, 192, 192, 256, 512, 512]
    assert cache_bucket(160, 100) == 100                      # never past max_len
    sizes = {cache_bucket(n, 2048) for n in range(1, 2049)}
    assert sizes == {64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048} and MIN_CACHE_BUCKET == 64
    assert all(cache_bucket(n, 2048) < 1.5 * n + 1 for n in range(MIN_CACHE_BUCKET, 2049))   # little waste


def test_greedy_same_as_max_len_cache_and_compiles_bounded(tok, model):
    """Requests needing 13..258 slots use the buckets 64, 96, 128, 192 and 256 (= max_len): one
    compile each, none on repeats; every greedy completion equals the unbucketed engine's."""
    ps, pe = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
    bucketed = Engine(model, tok, max_len=MAX_LEN)
    full = Engine(model, tok, max_len=MAX_LEN, bucket_cache=False)
    prompts = prompts_of(tok)
    steer = [[5, ps] + tok.encode("6*7") + [pe], [], []]     # row 0 calls the calculator mid-generation
    longest = max(len(p) for p in prompts)
    plan = [(5, 64), (50, 64), (57, 96), (90, 128), (100, 128), (150, 192), (MAX_LEN - longest - 1, MAX_LEN)]
    for max_tokens, want_len in plan + plan:
        kw = dict(max_tokens=max_tokens, temperature=0.0, stop_tokens=[], _steer=steer)
        got = bucketed.generate(prompts, **kw)
        assert bucketed.last_cache_len == want_len == cache_bucket(longest + max_tokens, MAX_LEN)
        want = full.generate(prompts, **kw)
        assert full.last_cache_len == MAX_LEN
        assert [(c[0].tokens, c[0].forced) for c in got] == [(c[0].tokens, c[0].forced) for c in want]
        assert all(len(c[0].tokens) == max_tokens for c in got)
    assert sum(got[0][0].forced) == 4                          # <|output_start|> 42 <|output_end|>
    assert bucketed.compile_counts["segment"] == 5 and full.compile_counts["segment"] == 1
    # streaming uses the same buckets, compiled once each
    streamed = list(bucketed.stream(prompts[1], max_tokens=50, temperature=0.0, stop_tokens=[]))
    assert streamed == full.generate([prompts[1]], max_tokens=50, temperature=0.0, stop_tokens=[])[0][0].tokens
    assert bucketed.last_cache_len == 64 and bucketed.compile_counts["step"] == 1


def test_speculative_filling_its_bucket_equals_plain(tok, model):
    """prompt + max_tokens = 64 exactly: the last target forwards write past the 64-slot cache
    (dropped) and emission must stop where the max_len cache would have let it continue."""
    draft = TinyModel(tok.vocab_size, depth=1, seed=7)
    spec = Engine(model, tok, max_len=MAX_LEN, draft=draft, spec_k=3)
    full = Engine(model, tok, max_len=MAX_LEN, bucket_cache=False)
    prompt = prompts_of(tok)[0]
    kw = dict(max_tokens=64 - len(prompt), temperature=0.0, stop_tokens=[], use_tools=False)
    got = spec.generate([prompt], **kw)[0][0].tokens
    assert spec.last_cache_len == 64 and len(got) == 64 - len(prompt)
    assert got == full.generate([prompt], **kw)[0][0].tokens


def _loop_body_hlo(engine, prompts, max_tokens):
    """Optimized HLO of the engine's decode segment for this request."""
    cfg = engine._settings(max_tokens, 1.0, 0, 1.0, False, [])
    cache_len = engine._cache_len(prompts, max_tokens)
    params = engine.prepare(engine.model.param_tree())
    st, _ = engine._start(params, prompts, 1, 0, None, False, cache_len)
    return engine._segment.lower(params, st, cfg).compile().as_text(), cache_len


@pytest.mark.parametrize("n_prompts,B", [(3, 4), (1, 1)])              # batch buckets 4 and 1
def test_decode_loop_reads_caches_and_weights_in_place(tok, model, n_prompts, B):
    """Batch 1 is its own case: there XLA:CPU copied every cache every step unless its copy insertion
    uses region analysis (engine.loop_compiler_options)."""
    engine = Engine(model, tok, max_len=MAX_LEN)
    prompts = prompts_of(tok)[:n_prompts]
    hlo, S = _loop_body_hlo(engine, prompts, 100)
    s = model.spec
    keys, values = f"f32[{B},{s.n_kv_head},{S},{s.head_dim}]", f"f32[{B},{s.n_kv_head},{s.head_dim},{S}]"
    # a layer's K or V in any order (a transposed copy has the permuted shape); at batch 1 also without the batch axis
    dims = [(B, s.n_kv_head, S, s.head_dim)] + ([(s.n_kv_head, S, s.head_dim)] if B == 1 else [])
    cache_like = {"f32[" + ",".join(map(str, p)) + "]" for d in dims for p in itertools.permutations(d)}
    weights = {f"f32[{s.n_embd},{s.n_embd}]", f"f32[{s.n_embd},{4 * s.n_embd}]", f"f32[{4 * s.n_embd},{s.n_embd}]"}
    produced = re.findall(r"^\s*(?:ROOT )?%(\S+) = (f32\[[\d,]+\])\S* (\w[\w-]*)\(", hlo, flags=re.M)
    for cache in (keys, values):     # the in-place writes (values (B,Hkv,D,S)); one row's is a dynamic-update-slice
        assert any(shape == cache and re.search(r"scatter|dynamic-update-slice", name) for name, shape, _ in produced), cache
    # a copy is an op of its own or a fusion XLA names after what it fuses (transpose_copy_fusion,
    # dynamic-slice_bitcast_fusion: the per-step copies the old stacked layout made)
    moved = [(name, shape) for name, shape, op in produced if (shape in cache_like or shape in weights)
             and (op in ("copy", "transpose", "slice", "dynamic-slice")
                  or (op == "fusion" and re.search(r"copy|transpose|(?<!update-)slice", name)))]
    assert moved == [], moved


def test_decode_loop_reads_rope_angles_from_a_table(tok, model):
    """kv_cache.decode gathers each position's cos/sin from a constant table: computed from the
    positions inside the loop, XLA:CPU fused them into every q/k rotation and evaluated them per head
    and element, every step."""
    hlo, _ = _loop_body_hlo(Engine(model, tok, max_len=MAX_LEN), prompts_of(tok)[:3], 100)
    assert re.search(r"\b(sine|cosine)\(", hlo) is None


def test_prepare_keeps_compute_dtype_tables_and_casts_the_rest(tok, model):
    """Engine.prepare passes the embedding/head tables through untouched when they are already in
    the compute dtype (a jit would copy them on every generate call) and otherwise equals
    inference_params, casts included; it compiles once."""
    engine = Engine(model, tok, max_len=MAX_LEN)
    params = model.param_tree()
    prepared = engine.prepare(params)
    assert all(prepared[name] is params[name] for name in TABLES)
    want = jax.jit(inference_params, static_argnums=1)(params, model.spec)
    assert jax.tree.structure(prepared) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, prepared, want)
    engine.prepare(params)
    assert engine.compile_counts["params"] == 1
    bf16 = dataclasses.replace(model.spec, compute_dtype="bfloat16")
    cast = params_preparer(bf16)(params)
    for name in TABLES:
        assert cast[name].dtype == jnp.bfloat16 and cast[name] is not params[name]
    assert cast["layers"][0]["p"]["mlp"]["c_fc"].dtype == jnp.bfloat16
    assert cast["resid_lambdas"].dtype == jnp.float32
