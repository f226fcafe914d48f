"""Golden test: the JAX GPT against an independent float64 NumPy forward pass of nanochat's model.

The reference below is written from nanochat's gpt.py semantics and shares no code with
flaxchat.model.gpt: it only reads the parameter arrays out of the model. Every parameter is randomised
to a non-trivial value (output projections, lambdas, gates, smear, backout, lm_head) so each feature
actually moves the logits. The model runs in fp32 with jax x64 off; agreement is ~1e-6 relative.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.model.gpt import GPT, gpt_forward


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """GPUs default to TF32 for fp32 matmuls; these comparisons need true fp32."""
    with jax.default_matmul_precision("highest"):
        yield


EPS = float(np.finfo(np.float32).eps)   # torch F.rms_norm(eps=None) on fp32 inputs


# ------------------------------------------------------------------ NumPy float64 reference
def _rms(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _rope(x, base=100000.0):
    B, T, H, D = x.shape
    inv = 1.0 / base ** (np.arange(0, D, 2, dtype=np.float64) / D)
    f = np.arange(T, dtype=np.float64)[:, None] * inv[None]
    cos, sin = np.cos(f)[None, :, None], np.sin(f)[None, :, None]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def _attention(q, k, v, window):
    B, T, H, D = q.shape
    group = H // k.shape[2]
    t = np.arange(T)
    allowed = (t[:, None] >= t[None]) & (t[:, None] - t[None] <= window)
    out = np.zeros_like(q)
    for h in range(H):
        kh, vh = k[:, :, h // group], v[:, :, h // group]
        s = np.einsum("btd,bsd->bts", q[:, :, h], kh) / np.sqrt(D)
        s = np.where(allowed[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", p, vh)
    return out


def reference_forward(P, cfg, windows, idx):
    """nanochat GPT.forward in float64. P: nested dict of np.float64 arrays (flaxchat layout)."""
    L, H, Hkv, D = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"]
    B, T = idx.shape
    x = _rms(P["wte"][idx])
    g = P["smear_lambda"] * _sigmoid(x[:, 1:, :24] @ P["smear_gate"])
    x = np.concatenate([x[:, :1], x[:, 1:] + g * x[:, :-1]], axis=1)
    x0 = x
    ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2]
    a, m = P["blocks"]["attn"], P["blocks"]["mlp"]
    x_back = None
    for i in range(L):
        x = P["resid_lambdas"][i] * x + P["x0_lambdas"][i] * x0
        h = _rms(x)
        q = (h @ a["c_q"][i]).reshape(B, T, H, D)
        k = (h @ a["c_k"][i]).reshape(B, T, Hkv, D)
        v = (h @ a["c_v"][i]).reshape(B, T, Hkv, D)
        if i in ve_layers:
            j = ve_layers.index(i)
            gate = 3 * _sigmoid(h[..., :12] @ a["ve_gate"][j])
            v = v + gate[..., None] * P["value_embeds"][j][idx].reshape(B, T, Hkv, D)
        q, k = _rope(q), _rope(k)
        q, k = 1.2 * _rms(q), 1.2 * _rms(k)
        y = _attention(q, k, v, windows[i]).reshape(B, T, H * D)
        x = x + y @ a["c_proj"][i]
        x = x + np.maximum(_rms(x) @ m["c_fc"][i], 0) ** 2 @ m["c_proj"][i]
        if i == L // 2:
            x_back = x
    x = _rms(x - P["backout_lambda"] * x_back)
    logits = (x @ P["lm_head"])[..., :cfg["vocab_size"]]
    return 15 * np.tanh(logits / 15)


def reference_loss(logits, targets):
    valid = targets != -1
    mx = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(-1)) + mx[..., 0]
    picked = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return ((lse - picked) * valid).sum() / valid.sum()


# ------------------------------------------------------------------ helpers
def randomise(model: GPT, seed: int) -> None:
    """Give every parameter a non-trivial random value (in place)."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten(pure)
    rng = np.random.default_rng(seed)
    new = []
    for leaf in leaves:
        shape = leaf.shape
        fan_in = shape[-2] if len(shape) >= 2 else 1
        new.append(jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape), jnp.float32))
    pure = jax.tree.unflatten(treedef, new)
    pure["wte"] = pure["wte"] * 0.8
    pure["lm_head"] = pure["lm_head"] * 6.0           # logits of several units: exercises the softcap
    pure["blocks"]["attn"]["ve_gate"] = pure["blocks"]["attn"]["ve_gate"] * 3.0
    pure["resid_lambdas"] = jnp.asarray(rng.uniform(0.8, 1.2, size=pure["resid_lambdas"].shape), jnp.float32)
    pure["x0_lambdas"] = jnp.asarray(rng.uniform(0.1, 0.5, size=pure["x0_lambdas"].shape), jnp.float32)
    pure["smear_lambda"] = jnp.asarray(0.7, jnp.float32)
    pure["backout_lambda"] = jnp.asarray(0.35, jnp.float32)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def as_numpy(model: GPT):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), model.param_tree())


def make_model(depth, n_kv_head, pattern, seq_len=256, seed=0):
    cfg = ModelConfig(depth=depth, aspect_ratio=32, head_dim=32, n_kv_head=n_kv_head, sequence_len=seq_len,
                      vocab_size=300, window_pattern=pattern, compute_dtype="float32")
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(seed))
    randomise(model, seed + 100)
    return model


def ref_cfg(spec):
    return dict(n_layer=spec.n_layer, n_head=spec.n_head, n_kv_head=spec.n_kv_head,
                head_dim=spec.head_dim, vocab_size=spec.vocab_size)


def assert_close(got, want, rel=1e-5):
    err = np.abs(np.asarray(got, np.float64) - want).max()
    scale = np.abs(want).max()
    print(f"max abs err {err:.3e}, scale {scale:.3e}")
    assert err <= rel * scale, f"max abs err {err:.3e} > {rel} * {scale:.3e}"


# ------------------------------------------------------------------ tests
def test_golden_logits_and_loss_windows_gqa():
    """Depth 4 (ve on layers 1,3), GQA 4q/2kv heads, SSL windows (128,128,L,L) at T=200 > 128."""
    assert not jax.config.jax_enable_x64
    model = make_model(depth=4, n_kv_head=2, pattern="SSL")
    s = model.spec
    assert s.n_head == 4 and s.n_kv_head == 2 and s.windows == (128, 128, 256, 256)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, s.vocab_size, size=(2, 200)).astype(np.int32)
    targets = rng.integers(0, s.vocab_size, size=(2, 200)).astype(np.int32)
    targets[0, :17] = -1
    want = reference_forward(as_numpy(model), ref_cfg(s), s.windows, idx)
    assert np.abs(want).max() > 5.0, "random weights should give logits of several units"
    got = model(jnp.asarray(idx))
    assert got.dtype == jnp.float32 and got.shape == (2, 200, 300)
    assert_close(got, want)
    loss = model(jnp.asarray(idx), jnp.asarray(targets))
    assert_close(loss, reference_loss(want, targets))


@pytest.mark.parametrize("depth,windows", [(3, (5, 17, 40)), (5, (8, 8, 3, 8, 40))])
def test_golden_small_windows_odd_depth(depth, windows):
    """Odd depths (ve on layers 0,2,..) and tiny windows well inside T, through the pure function."""
    model = make_model(depth=depth, n_kv_head=1, pattern="L", seq_len=64, seed=depth)
    spec = dataclasses.replace(model.spec, windows=windows)
    idx = np.random.default_rng(depth).integers(0, 300, size=(2, 40)).astype(np.int32)
    want = reference_forward(as_numpy(model), ref_cfg(spec), windows, idx)
    got = jax.jit(gpt_forward, static_argnums=1)(model.param_tree(), spec, jnp.asarray(idx))
    assert_close(got, want)
    # the windows matter: the same weights with full attention give different logits
    full = reference_forward(as_numpy(model), ref_cfg(spec), (40,) * depth, idx)
    assert np.abs(full - want).max() > 1e-3
