"""Behaviour of flaxchat.model.gpt / flaxchat.model.attention on tiny configs (CPU, fp32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxchat.model.attention import causal_attention
from flaxchat.config import ModelConfig
from flaxchat.model.flops import estimate_flops, mfu, num_matmul_params, peak_bf16_flops
from flaxchat.model.gpt import GPT, PARAM_AXES, gpt_forward

@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """GPUs default to TF32 for fp32 matmuls; these comparisons need true fp32."""
    with jax.default_matmul_precision("highest"):
        yield


VOCAB = 300   # padded to 320


def tokens(seed, shape, high=VOCAB):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, size=shape), jnp.int32)


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def tiny_config(depth=2, **kw) -> ModelConfig:
    base = dict(depth=depth, aspect_ratio=32, head_dim=32, sequence_len=64, vocab_size=VOCAB,
                window_pattern="SL", compute_dtype="float32")
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.derive()
    return cfg


def random_params(model: GPT, seed=0) -> dict:
    """Every parameter non-trivial (the default init zeroes c_proj and smear)."""
    leaves, treedef = jax.tree.flatten(model.param_tree())
    rng = np.random.default_rng(seed)   # numpy: eager jax.random calls each cost a CPU compile
    new = [jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim >= 2 else 1), jnp.float32)
           for x in leaves]
    pure = jax.tree.unflatten(treedef, new)
    pure["lm_head"] = pure["lm_head"] * 5.0
    pure["resid_lambdas"] = 1.0 + 0.1 * pure["resid_lambdas"]
    pure["smear_lambda"] = jnp.asarray(0.8)
    pure["backout_lambda"] = jnp.asarray(0.3)
    return pure


@pytest.fixture(scope="module")
def model():
    return GPT(tiny_config(n_kv_head=1), nnx.Rngs(0))


@pytest.fixture(scope="module")
def fwd():
    return jax.jit(gpt_forward, static_argnums=(1, 4))


def test_shapes_padded_vocab_and_axes(model):
    s = model.spec
    assert (s.n_embd, s.n_head, s.n_kv_head, s.padded_vocab_size) == (64, 2, 1, 320)
    tree = model.param_tree()
    assert tree["wte"].shape == (320, 64) and tree["lm_head"].shape == (64, 320)
    assert tree["value_embeds"].shape == (1, 320, 32)          # depth 2: only layer 1 has a ve
    assert tree["blocks"]["attn"]["c_q"].shape == (2, 64, 64)
    assert tree["blocks"]["attn"]["c_k"].shape == (2, 64, 32)
    assert tree["blocks"]["attn"]["ve_gate"].shape == (1, 12, 1)
    assert tree["blocks"]["mlp"]["c_fc"].shape == (2, 64, 256)
    assert jax.tree.structure(tree) == jax.tree.structure(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(PARAM_AXES, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert {k: tuple(v) for k, v in flat_specs.items()} == flat_axes
    logits = model(jnp.zeros((2, 8), jnp.int32))
    assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32


def test_padded_vocab_columns_never_reach_logits_or_loss(model, fwd):
    p = random_params(model)
    idx = tokens(1, (2, 16))
    base_logits, base_loss = fwd(p, model.spec, idx, None, "mean"), fwd(p, model.spec, idx, idx, "mean")
    p["lm_head"] = p["lm_head"].at[:, VOCAB:].set(100.0)
    np.testing.assert_array_equal(fwd(p, model.spec, idx, None, "mean"), base_logits)
    np.testing.assert_array_equal(fwd(p, model.spec, idx, idx, "mean"), base_loss)


def test_logits_at_gives_one_position_per_row(model, fwd):
    """gpt_forward(..., logits_at) runs the head on one position per row (the categorical eval's
    letters): those rows of the full logits."""
    p = random_params(model)
    idx = tokens(4, (3, 16))
    full = fwd(p, model.spec, idx, None, "mean")
    at = jnp.asarray([15, 0, 7], jnp.int32)
    got = fwd(p, model.spec, idx, None, "mean", at)
    assert got.shape == (3, VOCAB)
    want = full[jnp.arange(3), at]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_loss_ignore_index_and_reductions(model, fwd):
    p = random_params(model)
    idx = tokens(2, (2, 16))
    tgt = tokens(3, (2, 16)).at[0, :5].set(-1).at[1, 9].set(-1)
    logits = fwd(p, model.spec, idx, None, "mean")
    per_tok = fwd(p, model.spec, idx, tgt, "none")
    mean = fwd(p, model.spec, idx, tgt, "mean")
    assert per_tok.shape == (2, 16)
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = -jnp.take_along_axis(logp, jnp.maximum(tgt, 0)[..., None], -1)[..., 0]
    valid = tgt != -1
    np.testing.assert_allclose(per_tok, jnp.where(valid, want, 0.0), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(per_tok)[~np.asarray(valid)] == 0.0)
    np.testing.assert_allclose(mean, per_tok.sum() / valid.sum(), rtol=1e-6)
    np.testing.assert_allclose(mean, want[valid].mean(), rtol=1e-5)
    # changing the target of an ignored position changes nothing
    np.testing.assert_array_equal(fwd(p, model.spec, idx, tgt.at[0, 2].set(-1), "mean"), mean)
    all_ignored = fwd(p, model.spec, idx, jnp.full_like(tgt, -1), "mean")
    assert float(all_ignored) == 0.0


def test_init_follows_nanochat_and_depends_on_seed():
    cfg = tiny_config(depth=4)
    a, b, c = (GPT(cfg, nnx.Rngs(seed)).param_tree() for seed in (0, 0, 1))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["wte"], c["wte"]) and not np.array_equal(a["blocks"]["attn"]["c_q"], c["blocks"]["attn"]["c_q"])
    bound = 3 ** 0.5 / cfg.n_embd ** 0.5
    assert abs(float(a["wte"].std()) - 0.8) < 0.02 and abs(float(a["lm_head"].std()) - 0.001) < 3e-5
    for name in ("c_q", "c_k", "c_v"):
        w = a["blocks"]["attn"][name]
        assert float(jnp.abs(w).max()) <= bound and float(jnp.abs(w).max()) > 0.95 * bound
    fc = a["blocks"]["mlp"]["c_fc"]
    assert 0.95 * 0.4 * bound < float(jnp.abs(fc).max()) <= 0.4 * bound
    ve = a["value_embeds"]
    assert ve.shape[0] == 2 and 0.95 * bound < float(jnp.abs(ve).max()) <= bound
    assert not jnp.any(a["blocks"]["attn"]["c_proj"]) and not jnp.any(a["blocks"]["mlp"]["c_proj"])
    for gate in (a["blocks"]["attn"]["ve_gate"], a["smear_gate"]):
        assert float(gate.min()) >= 0.0 and float(gate.max()) <= 0.02 and float(gate.max()) > 0.01
    np.testing.assert_allclose(a["resid_lambdas"], [1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05], rtol=1e-6)
    np.testing.assert_allclose(a["x0_lambdas"], [0.20, 0.15, 0.10, 0.05], rtol=1e-6)
    assert float(a["smear_lambda"]) == 0.0 and abs(float(a["backout_lambda"]) - 0.2) < 1e-7


def test_causality(model, fwd):
    p = random_params(model)
    idx = tokens(4, (1, 24))
    base = fwd(p, model.spec, idx, None, "mean")
    changed = fwd(p, model.spec, idx.at[0, 10].set((idx[0, 10] + 1) % VOCAB), None, "mean")
    np.testing.assert_array_equal(changed[:, :10], base[:, :10])
    assert np.abs(np.asarray(changed[:, 10:] - base[:, 10:])).max() > 1e-4


def test_attention_function_window_limits_keys():
    """q at position t must see exactly keys t-w..t (FA3 window (w, 0)), per the layer's slot."""
    T, H, D = 32, 2, 16
    q, k, v = (normal(seed, (1, T, H, D)) for seed in (50, 51, 52))
    windows = (4, 32)
    att = jax.jit(lambda q, k, v, slot: causal_attention(q, k, v, slot, windows, "xla"))
    t = 20
    for slot, w in enumerate(windows):
        base = att(q, k, v, jnp.int32(slot))
        for src in range(T):
            vv = v.at[0, src].add(normal(53, (H, D)))
            moved = np.abs(np.asarray(att(q, k, vv, jnp.int32(slot))[0, t] - base[0, t])).max() > 1e-6
            assert moved == (t - w <= src <= t), (slot, src)


def test_model_windows_limit_receptive_field(model, fwd):
    """All-short 2-layer model with window 4: token 0 can reach positions <= 2*4 + 1 (smear) only."""
    p = random_params(model)
    spec = dataclasses.replace(model.spec, windows=(4, 4))
    idx = tokens(6, (1, 24))
    base = fwd(p, spec, idx, None, "mean")
    changed = fwd(p, spec, idx.at[0, 0].set((idx[0, 0] + 7) % VOCAB), None, "mean")
    diff = np.abs(np.asarray(changed - base))[0].max(-1)
    assert np.all(diff[10:] == 0.0), diff
    assert diff[9] > 0.0 and diff[5] > 0.0
    full = fwd(p, dataclasses.replace(model.spec, windows=(64, 64)), idx, None, "mean")
    assert np.abs(np.asarray(full - base)).max() > 1e-4


def test_remat_variants_and_module_grads_agree():
    """nnx.value_and_grad through GPT.__call__ (no remat) == jax.grad of the pure function with
    remat 'full' and 'dots'."""
    m = GPT(tiny_config(depth=2), nnx.Rngs(0))
    p = random_params(m)
    state = nnx.state(m, nnx.Param)
    nnx.replace_by_pure_dict(state, p)
    nnx.update(m, state)
    idx = tokens(7, (2, 8))
    l0, g0 = nnx.jit(nnx.value_and_grad(lambda model: model(idx, idx)))(m)
    g0 = nnx.to_pure_dict(g0)
    assert float(jnp.abs(g0["blocks"]["mlp"]["c_proj"]).max()) > 0 and float(jnp.abs(g0["smear_gate"]).max()) > 0
    for remat in ("full", "dots"):
        spec = dataclasses.replace(m.spec, remat=remat)
        l1, g1 = jax.jit(jax.value_and_grad(lambda p: gpt_forward(p, spec, idx, idx)))(p)
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)


def test_layers_are_scanned_jaxpr_does_not_grow_with_depth():
    counts = []
    for depth in (2, 6):
        m = GPT(tiny_config(depth=depth), nnx.Rngs(0))
        idx = jnp.zeros((1, 8), jnp.int32)
        loss_grad = jax.grad(lambda p: gpt_forward(p, m.spec, idx, idx))
        counts.append((len(jax.make_jaxpr(lambda p: gpt_forward(p, m.spec, idx))(m.param_tree()).eqns),
                       len(jax.make_jaxpr(loss_grad)(m.param_tree()).eqns)))
    assert counts[0] == counts[1], counts


def test_rope_table_is_a_trace_time_constant(model):
    """No cos/sin in the jaxpr of a training step: staged there, XLA:CPU re-evaluates them inside
    every consumer fusion (per head and element). The table equals the staged computation up to an
    ulp or two (op-by-op evaluation, as torch does it, rounds like XLA's fused kernel only mostly)."""
    from flaxchat.model.attention import rope_cos_sin, rope_table
    idx = tokens(0, (2, 16))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: gpt_forward(p, model.spec, idx, idx)))(model.param_tree()))
    assert " cos " not in jaxpr and " sin " not in jaxpr
    staged = jax.jit(lambda: rope_cos_sin(jnp.arange(16, dtype=jnp.int32), model.spec.head_dim))()
    for a, b in zip(rope_table(16, model.spec.head_dim), staged):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=3e-7)


def test_bf16_compute_keeps_fp32_masters_and_close_loss(model, fwd):
    mb = GPT(tiny_config(depth=2, n_kv_head=1, compute_dtype="bfloat16"), nnx.Rngs(0))
    assert mb.spec.dtype == jnp.bfloat16 and mb.wte[...].dtype == jnp.float32
    p = random_params(model)
    idx = tokens(8, (2, 16))
    l32, l16 = fwd(p, model.spec, idx, idx, "mean"), fwd(p, mb.spec, idx, idx, "mean")
    assert l16.dtype == jnp.float32 and abs(float(l16) - float(l32)) < 0.05 * float(l32)
    assert float(l16) != float(l32)     # the bf16 path really ran in bf16


def test_splash_attention_interpret_mode_matches_xla():
    """The TPU kernel in Pallas interpret mode on CPU (a real TPU run is still untested)."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    T, H, D = 128, 2, 32
    q = normal(90, (1, T, H, D))
    k, v = normal(91, (1, T, 1, D)), normal(92, (1, T, 1, D))
    windows = (50, 128)
    for slot in (0, 1):
        want = causal_attention(q, k, v, jnp.int32(slot), windows, "xla")
        got = causal_attention(q, k, v, jnp.int32(slot), windows, "splash")
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_flops_and_mfu():
    cfg = tiny_config(depth=4, sequence_len=512, window_pattern="SSSL")
    m = GPT(cfg, nnx.Rngs(0))
    tree = m.param_tree()
    matmul = sum(x.size for x in jax.tree.leaves(tree["blocks"])) + tree["lm_head"].size + tree["smear_gate"].size
    assert num_matmul_params(m.spec) == matmul
    s = m.spec
    assert s.windows == (128, 128, 128, 512)
    attn = 12 * s.n_head * s.head_dim * (3 * 128 + 512)
    assert estimate_flops(s) == 6 * matmul + attn
    assert peak_bf16_flops("TPU v5 lite") == 197e12 and peak_bf16_flops("TPU v5") == 459e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_bf16_flops("cpu") is None
    assert mfu(1e5, 6e9, 4, "TPU v6 lite") == pytest.approx(1e5 * 6e9 / (4 * 918e12))
    assert np.isnan(mfu(1e5, 6e9, 1, "cpu"))
