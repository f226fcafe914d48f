"""GRPO objective: advantages and token weights vs NumPy loops, the clipped surrogate / k3 KL vs a
NumPy reference (values and gradients), zero gradient through forced tokens of a tiny GPT, and a
few SGD steps through the real training step raising a rewarded sequence's log-prob."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.model.gpt import GPT
from flaxchat.rl import (RLConfigError, compute_advantages, grpo_loss_fn, policy_loss, sequence_logprobs,
                         token_weights)
from flaxchat.train.loop import make_train_step

CL, CH = 0.2, 0.28


# ----------------------------------------------------------------------------------------------
# advantages

def ref_advantages(r: np.ndarray, estimator: str, eps: float = 1e-6) -> np.ndarray:
    P, G = r.shape
    out = np.zeros((P, G))
    for p in range(P):
        g = [float(x) for x in r[p]]
        mean = sum(g) / G
        var = sum((x - mean) ** 2 for x in g) / G
        for i in range(G):
            if estimator == "drgrpo":
                out[p, i] = g[i] - mean
            elif estimator == "grpo":
                out[p, i] = (g[i] - mean) / (var ** 0.5 + eps)
            else:
                others = [g[j] for j in range(G) if j != i]
                out[p, i] = g[i] - sum(others) / (G - 1)
    return out


def reward_sets():
    rng = np.random.default_rng(0)
    cont = rng.normal(size=(6, 5))
    binary = rng.integers(0, 2, size=(8, 4)).astype(np.float64)
    binary[0], binary[1] = 1.0, 0.0                      # all-correct and all-wrong groups
    mixed = rng.uniform(size=(4, 8))
    mixed[2] = 0.1                                       # constant non-representable group
    return {"continuous": cont, "binary": binary, "mixed": mixed}


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("kind", ["continuous", "binary", "mixed"])
def test_advantages_match_numpy_loop(estimator, kind):
    r = reward_sets()[kind]
    adv = compute_advantages(r, estimator)
    assert adv.dtype == np.float32 and adv.shape == r.shape
    np.testing.assert_allclose(adv, ref_advantages(r, estimator), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_constant_groups_give_exactly_zero(estimator):
    # G = 3 and 0.1: the float64 mean of (0.1, 0.1, 0.1) is not 0.1, so r - mean is -1.4e-17, which
    # / (0 + eps) would leak a 1e-11 "advantage" unless constant groups are zeroed explicitly
    r = np.array([[1.0] * 3, [0.0] * 3, [0.1] * 3, [0.8132702392002724] * 3, [0.0, 1.0, 0.0]])
    assert np.any(r[2] - r[2].mean() != 0.0)
    adv = compute_advantages(r, estimator)
    assert np.all(np.isfinite(adv))
    assert np.all(adv[:4] == 0.0)
    assert np.all(adv[4] != 0.0)


def test_grpo_binary_is_zscore():
    # one success out of four: mean .25, population std sqrt(.25*.75)
    adv = compute_advantages(np.array([[1.0, 0.0, 0.0, 0.0]]), "grpo", eps=0.0)
    s = np.sqrt(0.25 * 0.75)
    np.testing.assert_allclose(adv[0], [0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s], rtol=1e-6)


def test_rloo_is_scaled_drgrpo():
    r = np.random.default_rng(1).normal(size=(5, 6))
    G = r.shape[1]
    np.testing.assert_allclose(compute_advantages(r, "rloo"), G / (G - 1) * (r - r.mean(1, keepdims=True)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_single_sample_groups_error(estimator):
    with pytest.raises(RLConfigError, match="samples_per_prompt.*drgrpo"):
        compute_advantages(np.ones((3, 1)), estimator)
    assert np.all(compute_advantages(np.array([[1.0], [0.0]]), "drgrpo") == 0.0)


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(RLConfigError, match="grpo.*drgrpo.*rloo"):
        compute_advantages(np.ones((2, 2)), "ppo")
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(np.array([[1.0, np.nan]]), "drgrpo")


# ----------------------------------------------------------------------------------------------
# token weights

def uneven_mask(N=8, T=12, seed=0):
    rng = np.random.default_rng(seed)
    m = np.zeros((N, T), np.int32)
    for i in range(N):
        start = rng.integers(0, T // 2)                  # prompt length
        end = rng.integers(start, T + 1)                 # response end (then padding)
        m[i, start:end] = 1
        m[i, rng.integers(0, T, 2)] = 0                  # forced tool-output tokens
    m[3] = 0                                             # a row with no loss tokens at all
    m[5, :] = 1                                          # and a full one
    return m


def simulated_loop(w: np.ndarray, x: np.ndarray, num_micro: int) -> float:
    """What the training loop does: equal contiguous micro-batches, sum(w*x) each, then average."""
    micro = [float(np.sum(wb.astype(np.float64) * xb)) for wb, xb in
             zip(np.split(w, num_micro), np.split(x, num_micro))]
    return sum(micro) / num_micro


def direct(mask: np.ndarray, x: np.ndarray, aggregation: str) -> float:
    if aggregation == "token_mean":
        vals = [x[i, t] for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
        return sum(vals) / len(vals)
    per_seq = []
    for i in range(mask.shape[0]):
        vals = [x[i, t] for t in range(mask.shape[1]) if mask[i, t]]
        per_seq.append(sum(vals) / len(vals) if vals else 0.0)
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("num_micro", [1, 2, 4, 8])
def test_token_weights_reproduce_aggregation_through_micro_batches(aggregation, num_micro):
    mask = uneven_mask()
    x = np.random.default_rng(2).normal(size=mask.shape) * 3 + 1
    w = token_weights(mask, aggregation, num_micro)
    assert w.dtype == np.float32 and w.shape == mask.shape
    assert np.all(w[mask == 0] == 0.0) and np.all(w[3] == 0.0)
    np.testing.assert_allclose(simulated_loop(w, x, num_micro), direct(mask, x, aggregation), rtol=1e-6)


def test_token_weights_aggregations_differ_and_validate():
    mask = uneven_mask()
    x = np.random.default_rng(3).normal(size=mask.shape)
    assert abs(direct(mask, x, "token_mean") - direct(mask, x, "seq_mean_token_mean")) > 1e-3
    assert np.all(token_weights(np.zeros((4, 5)), "token_mean", 2) == 0.0)
    with pytest.raises(RLConfigError, match="multiple"):
        token_weights(mask, "token_mean", 3)
    with pytest.raises(RLConfigError, match="token_mean.*seq_mean_token_mean"):
        token_weights(mask, "sum", 1)


# ----------------------------------------------------------------------------------------------
# policy loss vs NumPy

def np_policy_loss(logp, old, adv, w, cl, ch, beta=0.0, ref=None):
    logp, old, w = (np.asarray(a, np.float64) for a in (logp, old, w))
    ratio = np.exp(logp - old)
    a = np.asarray(adv, np.float64)[:, None]
    obj = np.minimum(ratio * a, np.clip(ratio, 1 - cl, 1 + ch) * a)
    if beta:
        d = np.asarray(ref, np.float64) - logp
        obj = obj - beta * (np.exp(d) - d - 1)
    return -np.sum(w * obj)


def rand_case(B=4, T=6, seed=0):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, size=(B, T)).astype(np.float32)
    old = (logp + rng.normal(scale=0.4, size=(B, T))).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.int32)
    w = token_weights(mask, "token_mean", 1)
    return logp, old, adv, w


def test_ratio_one_is_reinforce():
    logp, _, adv, w = rand_case()
    f = lambda lp: policy_loss(lp, jax.lax.stop_gradient(lp), adv, w, clip_low=CL, clip_high=CH)[0]
    loss, g = jax.value_and_grad(f)(jnp.asarray(logp))
    np.testing.assert_allclose(loss, -np.sum(w * adv[:, None]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g, -w * adv[:, None], rtol=1e-6, atol=1e-9)   # grad of -sum(w A logp)
    _, stats = policy_loss(logp, logp, adv, w, clip_low=CL, clip_high=CH)
    np.testing.assert_allclose(stats["ratio"], 1.0, rtol=1e-6)
    assert float(stats["clip_frac"]) == 0.0


def test_clipping_matches_ppo_and_zeroes_gradient_of_clipped_tokens():
    # ratios inside and outside [1-CL, 1+CH], positive and negative advantages
    ratios = np.array([0.5, 0.79, 0.9, 1.0, 1.1, 1.27, 1.5, 3.0], np.float32)
    old = np.full((2, 8), -1.2, np.float32)
    logp = (old + np.log(ratios)[None]).astype(np.float32)
    adv = np.array([1.5, -0.7], np.float32)
    w = np.full((2, 8), 1 / 16, np.float32)
    f = lambda lp: policy_loss(lp, old, adv, w, clip_low=CL, clip_high=CH)
    (loss, stats), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    np.testing.assert_allclose(loss, np_policy_loss(logp, old, adv, w, CL, CH), rtol=1e-5)
    r = np.exp(logp.astype(np.float64) - old)
    clipped = np.stack([r[0] > 1 + CH, r[1] < 1 - CL])   # where min() picks the clipped branch
    assert clipped[0].tolist() == [False] * 5 + [False, True, True]
    assert clipped[1].tolist() == [True, True] + [False] * 6
    g = np.asarray(g)
    assert np.all(g[clipped] == 0.0)
    # unclipped tokens: d(-w r A)/dlogp = -w r A
    np.testing.assert_allclose(g[~clipped], (-w * r * adv[:, None])[~clipped], rtol=1e-5)
    np.testing.assert_allclose(stats["clip_frac"], clipped.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["ratio"], r.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["entropy"], -logp.mean(), rtol=1e-5)


def test_random_case_matches_numpy():
    logp, old, adv, w = rand_case(seed=4)
    loss, _ = policy_loss(logp, old, adv, w, clip_low=CL, clip_high=CH)
    np.testing.assert_allclose(loss, np_policy_loss(logp, old, adv, w, CL, CH), rtol=1e-5, atol=1e-7)


def test_k3_kl_value_and_gradient_vs_finite_differences():
    logp, old, adv, w = rand_case(seed=5)
    ref = (logp + np.random.default_rng(6).normal(scale=0.5, size=logp.shape)).astype(np.float32)
    beta = 0.3
    f = lambda lp: policy_loss(lp, old, adv, w, clip_low=CL, clip_high=CH, kl_beta=beta, ref_logp=ref)
    (loss, stats), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    np.testing.assert_allclose(loss, np_policy_loss(logp, old, adv, w, CL, CH, beta, ref), rtol=1e-5)
    d = ref.astype(np.float64) - logp
    k3 = np.exp(d) - d - 1
    live = w != 0
    np.testing.assert_allclose(stats["kl"], np.sum(w * k3) / np.sum(w), rtol=1e-5)
    assert float(stats["kl"]) > 0
    # central differences of the float64 NumPy reference, token by token
    h = 1e-5
    fd = np.zeros(logp.shape)
    for idx in np.ndindex(logp.shape):
        lp_p, lp_m = logp.astype(np.float64), logp.astype(np.float64)
        lp_p[idx] += h
        lp_m[idx] -= h
        fd[idx] = (np_policy_loss(lp_p, old, adv, w, CL, CH, beta, ref)
                   - np_policy_loss(lp_m, old, adv, w, CL, CH, beta, ref)) / (2 * h)
    np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-3, atol=1e-6)
    assert np.all(np.asarray(g)[~live] == 0.0)
    # the KL term alone contributes beta * w * (1 - exp(d)) to dloss/dlogp
    (_, _), g0 = jax.value_and_grad(lambda lp: policy_loss(lp, old, adv, w, clip_low=CL, clip_high=CH),
                                    has_aux=True)(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(g) - np.asarray(g0), beta * w * (1 - np.exp(d)), rtol=1e-4, atol=1e-7)


def test_kl_beta_zero_ignores_ref_and_positive_beta_requires_it():
    logp, old, adv, w = rand_case(seed=7)
    garbage = np.full(logp.shape, np.nan, np.float32)
    f = lambda lp, ref: policy_loss(lp, old, adv, w, clip_low=CL, clip_high=CH, kl_beta=0.0, ref_logp=ref)[0]
    l0, g0 = jax.value_and_grad(f)(jnp.asarray(logp), None)
    l1, g1 = jax.value_and_grad(f)(jnp.asarray(logp), garbage)
    assert float(l0) == float(l1) and np.array_equal(g0, g1) and np.isfinite(float(l0))
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, w, clip_low=CL, clip_high=CH, kl_beta=0.1)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logp, old, adv, w, clip_low=1.0, clip_high=CH)


def test_masked_garbage_gives_no_nan_and_no_gradient():
    logp, old, adv, w = rand_case(seed=8)
    ref = logp - 0.1
    dead = w == 0
    assert dead.any()
    bad_logp = np.where(dead, -np.inf, logp).astype(np.float32)
    bad_old = np.where(dead, np.inf, old).astype(np.float32)
    bad_ref = np.where(dead, np.nan, ref).astype(np.float32)
    f = lambda lp, o, r: policy_loss(lp, o, adv, w, clip_low=CL, clip_high=CH, kl_beta=0.2, ref_logp=r)
    (l_clean, s_clean), g_clean = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), old, ref)
    (l_bad, s_bad), g_bad = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(bad_logp), jnp.asarray(bad_old), jnp.asarray(bad_ref))
    assert np.isfinite(float(l_bad)) and float(l_bad) == float(l_clean)
    for gb in g_bad:
        assert np.all(np.isfinite(gb)) and np.all(np.asarray(gb)[dead] == 0.0)
    np.testing.assert_array_equal(g_bad[0], g_clean)
    for k in s_clean:
        assert float(s_bad[k]) == float(s_clean[k]), k


def test_policy_loss_jits():
    logp, old, adv, w = rand_case(seed=9)
    f = jax.jit(lambda *a: policy_loss(*a, clip_low=CL, clip_high=CH, kl_beta=0.1, ref_logp=a[0] + 0.05))
    loss, stats = f(logp, old, adv, w)
    np.testing.assert_allclose(loss, np_policy_loss(logp, old, adv, w, CL, CH, 0.1, logp + 0.05), rtol=1e-5)
    assert set(stats) == {"clip_frac", "ratio", "kl", "entropy"}


# ----------------------------------------------------------------------------------------------
# tiny GPT

VOCAB, T = 300, 16


def tiny_gpt(seed=0) -> GPT:
    cfg = ModelConfig(depth=1, aspect_ratio=64, head_dim=32, sequence_len=T, vocab_size=VOCAB,
                      window_pattern="L", compute_dtype="float32")
    cfg.derive()
    model = GPT(cfg, nnx.Rngs(seed))
    # the default init zeroes c_proj/smear; give every parameter a value so every path has gradient
    leaves, treedef = jax.tree.flatten(model.param_tree())
    rng = np.random.default_rng(seed)
    new = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim >= 2 else 1)
                                                   * 0.5, jnp.float32) for x in leaves])
    new["resid_lambdas"] = 1.0 + 0.1 * new["resid_lambdas"]
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt()


def rollout_batch(seed=0, B=4):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(B, T + 1)).astype(np.int32)
    inputs, full_targets = ids[:, :-1], ids[:, 1:].copy()
    mask = np.ones((B, T), np.int32)
    mask[:, :4] = 0                      # prompt
    mask[0, 7:10] = 0                    # tool output forced by the engine
    mask[2, 5:6] = 0
    mask[3, 12:] = 0                     # padding
    return inputs, full_targets, mask


def grad_fn(model, loss_fn):
    """batch -> (loss, flat grads wrt the params); compiled once per batch structure."""
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(gdef, p, rest), b)))

    def run(batch):
        loss, g = f(params, {k: jnp.asarray(v) for k, v in batch.items()})
        return float(loss), [np.asarray(x) for x in jax.tree.leaves(g)]
    return run


def test_forced_tokens_carry_no_gradient(gpt):
    inputs, full_targets, mask = rollout_batch()
    forced = mask == 0
    targets = np.where(forced, -1, full_targets).astype(np.int32)
    logp_fn = jax.jit(lambda i, t: sequence_logprobs(gpt, i, t))
    logp0 = np.asarray(logp_fn(inputs, targets))
    assert np.all(logp0[forced] == 0.0) and np.all(logp0[~forced] < 0.0)
    rng = np.random.default_rng(11)
    base = {"inputs": inputs, "targets": targets, "advantages": np.array([1.0, -0.5, 0.3, -0.8], np.float32),
            "old_logp": logp0 + rng.normal(scale=0.1, size=logp0.shape).astype(np.float32),
            "weights": token_weights(mask, "token_mean", 1),
            "ref_logp": logp0 - 0.2}
    loss_fn = grpo_loss_fn(CL, CH, kl_beta=0.05)
    grads_of = grad_fn(gpt, loss_fn)
    l_ref, g_ref = grads_of(base)
    assert np.isfinite(l_ref) and any(np.abs(x).max() > 0 for x in g_ref)

    # the would-be targets at forced positions (real ids, or other ids) change nothing
    other = rng.integers(0, VOCAB, size=targets.shape).astype(np.int32)
    for alt in (full_targets, other):
        l_alt, g_alt = grads_of({**base, "targets": np.where(forced, alt, targets).astype(np.int32)})
        assert l_alt == pytest.approx(l_ref, rel=1e-6, abs=1e-7)
        for a, b in zip(g_alt, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # sensitivity: if those positions had weight, the same target change WOULD move the gradient
    w_leak = base["weights"] + np.where(forced, 0.05, 0.0).astype(np.float32)
    _, g1 = grads_of({**base, "weights": w_leak, "targets": np.where(forced, full_targets, targets)})
    _, g2 = grads_of({**base, "weights": w_leak, "targets": np.where(forced, other, targets)})
    assert max(np.abs(a - b).max() for a, b in zip(g1, g2)) > 1e-4

    # without old_logp the batch is on-policy: same gradient as old_logp == current logp (ratio 1)
    on_policy = {k: v for k, v in base.items() if k != "old_logp"}
    l_on, g_on = grads_of(on_policy)
    l_eq, g_eq = grads_of({**base, "old_logp": logp0})
    # the loss (~3e-3) is a sum of O(1) terms (advantage x ratio) that nearly cancel, and logp0 comes from a
    # separately compiled program that rounds differently: 3-4e-8 apart, 0.9-1.1e-5 relative; a wrong ratio
    # would move it by ~the advantages (1e-1)
    assert l_on == pytest.approx(l_eq, rel=1e-5, abs=1e-6)
    for a, b in zip(g_on, g_eq):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grads_of({k: v for k, v in base.items() if k != "ref_logp"})

    # dloss/dlogp is exactly zero at forced positions, non-zero elsewhere
    logp_full = logp_fn(inputs, full_targets)
    g_lp = np.asarray(jax.grad(lambda lp: policy_loss(lp, base["old_logp"], base["advantages"], base["weights"],
                                                      clip_low=CL, clip_high=CH, kl_beta=0.05,
                                                      ref_logp=base["ref_logp"])[0])(logp_full))
    assert np.all(g_lp[forced] == 0.0) and np.all(g_lp[~forced] != 0.0)


def test_sgd_steps_raise_the_rewarded_sequence_logprob():
    """Through the real jitted train step (2 micro-batches): on-policy GRPO with one rewarded
    sample in a group raises its log-prob and lowers the others'."""
    model = tiny_gpt(seed=1)
    B, accum = 4, 2
    rng = np.random.default_rng(12)
    prompt = rng.integers(0, VOCAB, size=5)
    ids = np.concatenate([np.tile(prompt, (B, 1)), rng.integers(0, VOCAB, size=(B, T + 1 - 5))], 1).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[:, :4] = 0
    inputs = ids[:, :-1]
    targets = np.where(mask == 0, -1, ids[:, 1:]).astype(np.int32)
    adv = compute_advantages(np.array([[1.0, 0.0, 0.0, 0.0]]), "grpo").reshape(B)
    weights = token_weights(mask, "token_mean", accum)
    logp_fn = jax.jit(lambda m, i, t: sequence_logprobs(m, i, t))

    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    step_fn = make_train_step(model, optimizer, grpo_loss_fn(CL, CH, 0.0))
    state = nnx.state((model, optimizer))
    first_bad = jnp.asarray(-1, jnp.int32)
    seq_logp = []
    for step in range(4):
        gdef, _ = nnx.split((model, optimizer))
        m, _ = nnx.merge(gdef, state)
        old = np.asarray(logp_fn(m, inputs, targets))
        seq_logp.append(old.sum(1))
        batch = {"inputs": inputs, "targets": targets, "advantages": adv, "old_logp": old, "weights": weights}
        stacked = {k: jnp.asarray(v.reshape(accum, B // accum, *v.shape[1:])) for k, v in batch.items()}
        state, loss, first_bad = step_fn(state, stacked, jnp.asarray(step), first_bad)
        # on-policy: the loop's averaged loss is -token_mean(A) over the whole batch
        np.testing.assert_allclose(float(loss), -np.sum(weights * adv[:, None]) / accum, rtol=1e-4, atol=1e-6)
    gdef, _ = nnx.split((model, optimizer))
    m, _ = nnx.merge(gdef, state)
    seq_logp.append(np.asarray(logp_fn(m, inputs, targets)).sum(1))
    seq_logp = np.stack(seq_logp)
    assert int(first_bad) == -1
    assert np.all(np.diff(seq_logp[:, 0]) > 0), seq_logp[:, 0]       # rewarded sample up every step
    assert seq_logp[-1, 0] - seq_logp[0, 0] > 0.5
    assert np.all(seq_logp[-1, 1:] < seq_logp[0, 1:])                # the others down
