"""The CPU-path custom-VJP ops equal plain autodiff of the plain computation: the fused LM head
(flaxchat.model.fused_head), the matmul backward (flaxchat.model.linear), block-causal attention
(flaxchat.model.chunked_attention), and the whole model on its CPU path against the plain one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.model.attention import causal_attention, window_mask
from flaxchat.model.chunked_attention import chunked_attention, num_blocks
from flaxchat.model.fused_head import chunk_len, head_loss, head_nll, head_nll_argmax
from flaxchat.model.gpt import GPT, gpt_forward
from flaxchat.model.linear import linear


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * max(scale, 1.0))


# ------------------------------------------------------------------ fused head
VOCAB, PADDED, SOFTCAP = 50, 64, 15.0
B, T, C = 2, 12, 16


def plain_nll(h, w, tgt, vocab=VOCAB):
    """The unfused head: logits in full, softcapped, log-softmax over the real vocab, -1 ignored."""
    z = SOFTCAP * jnp.tanh(jnp.matmul(h, w)[..., :vocab] / SOFTCAP)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(z), jnp.maximum(tgt, 0)[..., None], -1)[..., 0]
    return jnp.where(tgt != -1, nll, 0.0)


@pytest.fixture(scope="module")
def head_inputs():
    h = normal(1, (B, T, C))
    w = normal(2, (C, PADDED), 3.0)          # big logits: the softcap's tanh really bends
    tgt = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (B, T)), jnp.int32)
    tgt = tgt.at[1, 3].set(-1).at[0, :2].set(-1)
    return h, w, tgt


def test_chunk_len_divides_and_fits():
    assert chunk_len(8, 512, 1024) == 128 and chunk_len(4, 512, 1024) == 256
    assert chunk_len(2, 12, 8) == 4 and chunk_len(1, 7, 3) == 1 and chunk_len(2, 12, 10**6) == 12


@pytest.mark.parametrize("chunk", [12, 4, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_head_loss_equals_autodiff(head_inputs, chunk, reduction):
    h, w, tgt = head_inputs
    check_head_loss(h, w, tgt, chunk, reduction, VOCAB)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_head_loss_without_padded_columns(head_inputs, reduction):
    """vocab == padded width: the head skips its column mask (a static branch), same values."""
    h, w, tgt = head_inputs
    check_head_loss(h, w, tgt, 4, reduction, PADDED)


def check_head_loss(h, w, tgt, chunk, reduction, vocab):
    valid = (tgt != -1).astype(jnp.float32)
    weights = valid / valid.sum() if reduction == "mean" else valid
    fused = lambda h, w: 3.0 * head_loss(h, w, tgt, weights, SOFTCAP, vocab, chunk)     # cotangent 3
    plain = lambda h, w: 3.0 * (plain_nll(h, w, tgt, vocab) * weights).sum()
    lf, gf = jax.value_and_grad(fused, argnums=(0, 1))(h, w)
    lp, gp = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(lf, lp, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(fused)(h, w), lp, rtol=1e-6)               # the primal (no grad)
    assert_trees_close(gf, gp)
    assert not np.any(np.asarray(gf[1])[:, vocab:])                               # padded columns: no grad
    assert not np.any(np.asarray(gf[0])[1, 3])                                    # ignored row: no grad


@pytest.mark.parametrize("chunk", [12, 3])
def test_head_nll_per_token_equals_autodiff(head_inputs, chunk):
    """reduction 'none' (GRPO, eval): per-token values and an arbitrary per-token cotangent."""
    h, w, tgt = head_inputs
    g = normal(4, (B, T))
    got = head_nll(h, w, tgt, SOFTCAP, VOCAB, chunk)
    np.testing.assert_allclose(got, plain_nll(h, w, tgt), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got)[np.asarray(tgt) == -1] == 0.0)
    gf = jax.grad(lambda h, w: (head_nll(h, w, tgt, SOFTCAP, VOCAB, chunk) * g).sum(), argnums=(0, 1))(h, w)
    gp = jax.grad(lambda h, w: (plain_nll(h, w, tgt) * g).sum(), argnums=(0, 1))(h, w)
    assert_trees_close(gf, gp)


@pytest.mark.parametrize("chunk", [12, 4])
def test_head_nll_argmax_equals_the_full_logits(head_inputs, chunk):
    """CORE eval's forward-only head: per-token nll and the argmax over the real vocab (a padded
    column with the largest raw logit must not win)."""
    h, w, tgt = head_inputs
    w = w.at[:, VOCAB:].set(50.0)
    nll, top = head_nll_argmax(h, w, tgt, SOFTCAP, VOCAB, chunk)
    np.testing.assert_allclose(nll, plain_nll(h, w, tgt), rtol=1e-6, atol=1e-6)
    z = SOFTCAP * jnp.tanh(jnp.matmul(h, w)[..., :VOCAB] / SOFTCAP)
    assert top.dtype == jnp.int32 and np.array_equal(top, jnp.argmax(z, axis=-1))


def test_head_keeps_compute_dtype(head_inputs):
    h, w, tgt = head_inputs
    hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    weights = jnp.ones((B, T), jnp.float32)
    gh, gw = jax.grad(lambda h, w: head_loss(h, w, tgt, weights, SOFTCAP, VOCAB, 4), argnums=(0, 1))(hb, wb)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    want = jax.grad(lambda h, w: (plain_nll(h, w, tgt)).sum(), argnums=(0, 1))(h, w)
    assert_trees_close((gh.astype(jnp.float32), gw.astype(jnp.float32)), want, rtol=0.1, atol=0.03)


# ------------------------------------------------------------------ linear
@pytest.mark.parametrize("k,n", [(8, 24), (24, 8)])
def test_linear_equals_matmul_autodiff(k, n):
    x, w, g = normal(5, (3, 5, k)), normal(6, (k, n)), normal(7, (3, 5, n))
    np.testing.assert_array_equal(linear(x, w), jnp.matmul(x, w))
    got = jax.grad(lambda x, w: (linear(x, w) * g).sum(), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: (jnp.matmul(x, w) * g).sum(), argnums=(0, 1))(x, w)
    assert_trees_close(got, want)


# ------------------------------------------------------------------ chunked attention
def plain_attention(q, k, v, window):
    pos = jnp.arange(q.shape[1])
    mask = window_mask(pos, pos, window)[None, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


@pytest.mark.parametrize("T,window,hkv", [(256, 256, 2), (256, 10, 2), (256, 70, 1), (200, 130, 2), (40, 5, 2)])
def test_chunked_attention_equals_masked_attention(T, window, hkv):
    """Multi-block (T=256: 4 blocks of 64; T=200: 2 of 100) and single-block (T=40) plans, windows
    inside one block, across blocks and full causal; GQA with one and two kv heads."""
    H, D = 2, 8
    q, k, v, g = normal(10, (2, T, H, D)), normal(11, (2, T, hkv, D)), normal(12, (2, T, hkv, D)), normal(13, (2, T, H, D))
    np.testing.assert_allclose(chunked_attention(q, k, v, window), plain_attention(q, k, v, window), atol=2e-6)
    got = jax.grad(lambda *a: (chunked_attention(*a, window) * g).sum(), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: (plain_attention(*a, window) * g).sum(), argnums=(0, 1, 2))(q, k, v)
    assert_trees_close(got, want, atol=2e-6)


def test_chunked_attention_block_plans():
    assert num_blocks(512) == 4 and num_blocks(256) == 4 and num_blocks(200) == 2 and num_blocks(40) == 1


def test_causal_attention_switches_static_windows():
    """causal_attention(impl='chunked') picks the layer's window from the traced slot, like 'xla'."""
    q, k, v = normal(20, (1, 128, 2, 8)), normal(21, (1, 128, 1, 8)), normal(22, (1, 128, 1, 8))
    windows = (9, 128)
    run = jax.jit(lambda slot, impl: causal_attention(q, k, v, slot, windows, impl), static_argnums=1)
    for slot in (0, 1):
        np.testing.assert_allclose(run(jnp.int32(slot), "chunked"), run(jnp.int32(slot), "xla"), atol=2e-6)


# ------------------------------------------------------------------ whole model, CPU path vs plain
def test_model_cpu_path_equals_plain_path():
    cfg = ModelConfig(depth=3, aspect_ratio=32, head_dim=32, sequence_len=256, vocab_size=300,
                      window_pattern="SL", compute_dtype="float32")
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(0))
    assert model.spec.attention_impl == "chunked" and model.spec.cpu_train_path     # what "auto" picks on CPU
    plain = dataclasses.replace(model.spec, attention_impl="xla")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.normal(size=x.shape), jnp.float32), model.param_tree())
    idx = jnp.asarray(rng.integers(0, 300, (2, 256)), jnp.int32)
    tgt = idx.at[0, :7].set(-1)
    for reduction in ("mean", "none"):
        loss = lambda p, s: gpt_forward(p, s, idx, tgt, reduction).sum()
        got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model.spec)
        want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, plain)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        assert_trees_close(got[1], want[1])
