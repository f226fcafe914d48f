"""The cached decode path (flaxchat.model.kv_cache) equals the full forward pass (and its batch-1
attention, which reads the cache before the write, equals attention after it).

Every feature that touches the cache is live: random non-zero output projections, smear lambda and
gate, backout, value embeddings, GQA (4 query heads over 2 kv heads), and each window pattern, with
positions well past the short window.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.model.attention import cached_attention, cached_attention_before_write
from flaxchat.model.kv_cache import KVCache, init_cache, jit_decode, prepare_params
from flaxchat.model.kv_cache import decode as kv_decode
from flaxchat.model.gpt import GPT, gpt_forward


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """GPUs default to TF32 for fp32 matmuls; these comparisons need true fp32."""
    with jax.default_matmul_precision("highest"):
        yield


VOCAB = 300


def make(pattern: str, depth: int = 4, seq_len: int = 256, seed: int = 0, n_kv_head: int = 2):
    cfg = ModelConfig(depth=depth, aspect_ratio=32, head_dim=32, n_kv_head=n_kv_head, sequence_len=seq_len,
                      vocab_size=VOCAB, window_pattern=pattern, compute_dtype="float32")
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(seed))
    leaves, treedef = jax.tree.flatten(model.param_tree())
    rng = np.random.default_rng(seed + 1)
    p = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim >= 2 else 1),
                                                 jnp.float32) for x in leaves])
    p["lm_head"] = p["lm_head"] * 5.0
    p["resid_lambdas"] = 1.0 + 0.1 * p["resid_lambdas"]
    p["smear_lambda"], p["backout_lambda"] = jnp.asarray(0.8), jnp.asarray(0.3)
    return model.spec, p


def tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=shape), jnp.int32)


def generate_logits(decode, p, cache, idx, prefill):
    """Prefill idx[:, :prefill] in one chunk, then feed the rest one token at a time."""
    logits, cache = decode(p, cache, idx[:, :prefill])
    out = [logits]
    for t in range(prefill, idx.shape[1]):
        logits, cache = decode(p, cache, idx[:, t:t + 1])
        out.append(logits)
    return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("pattern", ["L", "SL", "SSSL"])
def test_prefill_then_decode_equals_full_forward(pattern):
    """sequence_len 256 -> short window 128; 150 tokens, the last 14 decoded one by one."""
    spec, p = make(pattern)
    want_windows = {"L": (256,) * 4, "SL": (128, 256, 128, 256), "SSSL": (128, 128, 128, 256)}[pattern]
    assert spec.windows == want_windows and spec.n_kv_head < spec.n_head
    idx = tokens(1, (2, 150))
    full = jax.jit(gpt_forward, static_argnums=1)(p, spec, idx)
    got, cache = generate_logits(jit_decode(spec), p, init_cache(spec, 2, 160), idx, prefill=136)
    np.testing.assert_allclose(got, full, rtol=2e-5, atol=2e-5 * float(jnp.abs(full).max()))
    assert np.array_equal(cache.pos, [150, 150])
    if pattern != "L":   # the windows are really in force: full attention would give other logits
        no_window = jax.jit(gpt_forward, static_argnums=1)(p, dataclasses.replace(spec, windows=(256,) * 4), idx)
        assert np.abs(np.asarray(no_window[:, 130:] - full[:, 130:])).max() > 1e-3


@pytest.mark.parametrize("prepared", [False, True])
def test_tiny_windows_and_chunked_prefill(prepared):
    """Windows of 3..9 tokens; prefill in two chunks (the second starts mid-sequence and must smear
    its first token with the cached previous embedding); each layer's window is its own. With plain
    params and with prepare_params' per-layer split (what the engine passes)."""
    spec, p = make("L", depth=3, seq_len=64, seed=3, n_kv_head=1)
    spec = dataclasses.replace(spec, windows=(3, 9, 64))
    idx = tokens(2, (1, 40))
    full = jax.jit(gpt_forward, static_argnums=1)(p, spec, idx)
    decode = jit_decode(spec)
    p = prepare_params(p, spec) if prepared else p
    cache = init_cache(spec, 1, 48)
    a, cache = decode(p, cache, idx[:, :11])
    b, cache = decode(p, cache, idx[:, 11:30])
    c, cache = generate_logits(decode, p, cache, idx[:, 30:], prefill=1)
    got = jnp.concatenate([a, b, c], axis=1)
    np.testing.assert_allclose(got, full, rtol=2e-5, atol=2e-5 * float(jnp.abs(full).max()))


def test_rows_at_different_positions():
    """Rows with different cache lengths (16 and 12) decode together; each matches the full forward."""
    spec, p = make("SL", depth=2, seq_len=64, seed=5, n_kv_head=1)
    spec = dataclasses.replace(spec, windows=(5, 64))
    decode = jit_decode(spec)
    idx = tokens(10, (2, 17))
    after_prefill = decode(p, init_cache(spec, 2, 32), idx[:, :12])[1]
    kept = jax.tree.map(jnp.copy, after_prefill)          # decode donates (deletes) its input cache
    advanced = generate_logits(decode, p, after_prefill, idx[:, 12:16], prefill=1)[1]
    after_prefill = kept
    # row 0 takes the cache that holds 16 tokens, row 1 the one that holds 12
    cache = KVCache(keys=tuple(jnp.stack([a[0], b[1]]) for a, b in zip(advanced.keys, after_prefill.keys)),
                    values=tuple(jnp.stack([a[0], b[1]]) for a, b in zip(advanced.values, after_prefill.values)),
                    pos=jnp.stack([advanced.pos[0], after_prefill.pos[1]]),
                    prev_embed=jnp.stack([advanced.prev_embed[0], after_prefill.prev_embed[1]]))
    assert np.array_equal(cache.pos, [16, 12])
    logits, cache = decode(p, cache, jnp.stack([idx[0, 16:17], idx[1, 12:13]]))
    full = jax.jit(gpt_forward, static_argnums=1)(p, spec, idx)
    want = jnp.stack([full[0, 16], full[1, 12]])
    np.testing.assert_allclose(logits[:, 0], want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    assert np.array_equal(cache.pos, [17, 13])


def test_logits_at_keeps_one_position_per_row():
    """decode(..., logits_at) runs the head on one position per row: those rows of the full logits,
    and the same cache; the engine's prefill takes each prompt's last token through it and hands the
    rows out by row_src."""
    from flaxchat.inference.engine import prefill
    spec, p = make("SL", depth=2, seq_len=64, seed=7, n_kv_head=1)
    decode = jit_decode(spec)
    idx = tokens(11, (2, 9))
    full_logits, full_cache = decode(p, init_cache(spec, 2, 16), idx)
    at = jnp.asarray([8, 3], jnp.int32)
    logits, cache = jax.jit(lambda p, c, i, a: kv_decode(p, spec, c, i, logits_at=a))(p, init_cache(spec, 2, 16), idx, at)
    assert logits.shape == (2, VOCAB)
    want = full_logits[jnp.arange(2), at]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(full_cache)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    lens = jnp.asarray([9, 4], jnp.int32)                   # row 1's prompt is padded after 4 tokens
    row_src = jnp.asarray([1, 0, 1], jnp.int32)
    cache, logits = jax.jit(prefill, static_argnums=(1, 2))(p, spec, 16, idx, lens, row_src)
    forward = jax.jit(gpt_forward, static_argnums=1)
    want = jnp.stack([forward(p, spec, idx[1:, :4])[0, 3], forward(p, spec, idx[:1])[0, 8]])[jnp.asarray([0, 1, 0])]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    assert np.array_equal(cache.pos, [4, 9, 4])


def test_model_methods_match_pure_decode():
    cfg = ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=64, vocab_size=VOCAB,
                      compute_dtype="float32")
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(0))
    cache = model.init_cache(2, 16)
    # one head-major buffer per layer, keys (B, Hkv, S, D) and values (B, Hkv, D, S);
    # .k and .v stack them token-major (the export layout)
    assert [k.shape for k in cache.keys] == [(2, 2, 16, 32)] * 2
    assert [v.shape for v in cache.values] == [(2, 2, 32, 16)] * 2
    assert cache.k.shape == cache.v.shape == (2, 2, 16, 2, 32) and cache.prev_embed.shape == (2, 64) and cache.max_len == 16
    idx = tokens(3, (2, 5))
    logits, cache = model.decode(idx, cache)
    np.testing.assert_allclose(logits, model(idx), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window", [4, 64])
def test_attention_before_the_write_equals_attention_after_it(dtype, window):
    """cached_attention_before_write (batch-1 decode) reads the cache before the token's k/v are
    written, with a stale entry in the token's own slot; it must equal cached_attention on the
    written cache. Rows at different positions, GQA (4 query heads over 2 kv heads)."""
    rng = np.random.default_rng(7)
    B, H, Hkv, D, S = 2, 4, 2, 32, 24
    pos = jnp.asarray([9, 17], jnp.int32)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    q, k_new, v_new = arr(B, 1, H, D), arr(B, 1, Hkv, D), arr(B, 1, Hkv, D)
    keys, values_t = arr(B, Hkv, S, D), arr(B, Hkv, D, S)
    rows = jnp.arange(B)
    keys = keys.at[rows, :, pos].set(100.0)                  # stale slots: would dominate if attended
    values_t = values_t.at[rows, :, :, pos].set(100.0)
    before = cached_attention_before_write(q, keys, values_t, k_new, v_new, pos[:, None], window)
    written_k = keys.at[rows, :, pos].set(k_new[:, 0])
    written_v = values_t.at[rows, :, :, pos].set(v_new[:, 0])
    after = cached_attention(q, written_k, written_v, pos[:, None], window)
    assert before.dtype == after.dtype == dtype and before.shape == (B, 1, H, D)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(before, np.float32), np.asarray(after, np.float32), rtol=tol, atol=tol)
