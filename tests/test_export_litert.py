"""LiteRT (TFLite) export: logits parity with gpt_forward and identical greedy generation.

The `litert` tests need tensorflow and ai-edge-litert (the `litert` extra) and skip without them;
the LiteRTUnavailable message test runs everywhere (it blocks the imports itself)."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.export.litert_export import LiteRTModel, LiteRTUnavailable, export_litert, litert_greedy
from flaxchat.model.gpt import gpt_forward

VOCAB = 300
SEQ_LEN = 48
N_NEW = 32

litert = pytest.mark.litert


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    from tiny_models import TinyModel
    model = TinyModel(VOCAB, depth=2)
    out = tmp_path_factory.mktemp("litert")
    desc = export_litert(model.params, model.spec, out, seq_len=SEQ_LEN)
    return model, out, desc


def _jax_logits(model):
    return jax.jit(lambda idx: gpt_forward(model.params, model.spec, idx))


@litert
def test_description(exported):
    _, out, desc = exported
    assert desc["files"] == ["model.tflite"] and (out / "model.tflite").stat().st_size == desc["bytes"]
    assert desc["inputs"] == [{"name": "tokens", "shape": [1, SEQ_LEN], "dtype": "int32"}]
    assert desc["outputs"] == [{"name": "logits", "shape": [1, SEQ_LEN, VOCAB], "dtype": "float32"}]
    assert "jax2tf" in desc["converter"] and "TFLiteConverter" in desc["converter"]


@litert
def test_logits_parity(exported):
    model, out, _ = exported
    lm = LiteRTModel(out)
    idx = np.random.default_rng(1).integers(0, VOCAB, (1, SEQ_LEN)).astype(np.int32)
    ref = np.asarray(_jax_logits(model)(jnp.asarray(idx)))[0]
    got = lm.logits(idx[0])
    assert got.shape == ref.shape == (SEQ_LEN, VOCAB) and got.dtype == np.float32
    scale = float(np.max(np.abs(ref)))
    rel = float(np.max(np.abs(got - ref))) / scale
    assert rel <= 1e-4, f"max |litert - jax| / max |jax| = {rel:.2e}"
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)
    # a shorter input is right-padded: causal attention leaves its positions untouched
    np.testing.assert_allclose(lm.logits(idx[0, :5]), ref[:5], rtol=1e-4, atol=1e-4 * scale)


@litert
def test_sliding_window_parity(exported, tmp_path):
    """A short window (8 tokens on layer 0) that really limits attention inside the exported window."""
    model, _, _ = exported
    spec = dataclasses.replace(model.spec, windows=(8, model.spec.sequence_len))
    export_litert(model.params, spec, tmp_path, seq_len=SEQ_LEN)
    idx = np.random.default_rng(3).integers(0, VOCAB, (1, SEQ_LEN)).astype(np.int32)
    ref = np.asarray(jax.jit(lambda i: gpt_forward(model.params, spec, i))(jnp.asarray(idx)))[0]
    full = np.asarray(_jax_logits(model)(jnp.asarray(idx)))[0]
    scale = float(np.max(np.abs(ref)))
    assert float(np.max(np.abs(ref - full))) > 1e-2 * scale          # the window changes the logits
    np.testing.assert_allclose(LiteRTModel(tmp_path).logits(idx[0]), ref, rtol=1e-4, atol=1e-4 * scale)


@litert
def test_greedy_matches_jax(exported):
    model, out, _ = exported
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, VOCAB, 8)]
    fwd = _jax_logits(model)
    ids, want = list(prompt), []
    for _ in range(N_NEW):                                # JAX greedy: full recompute, same padded window
        window = np.zeros((1, SEQ_LEN), np.int32)
        window[0, :len(ids)] = ids
        nxt = int(jnp.argmax(fwd(jnp.asarray(window))[0, len(ids) - 1]))
        want.append(nxt)
        ids.append(nxt)
    got = litert_greedy(out, prompt, N_NEW)
    assert got == want
    assert len(set(got)) > 1                              # not a degenerate repeat of one token


@litert
def test_window_overflow_is_an_error(exported):
    _, out, _ = exported
    with pytest.raises(ValueError, match="exported window of 48"):
        litert_greedy(out, [1] * 40, 10)


def test_unavailable_message(monkeypatch, tmp_path):
    """Without tensorflow / ai-edge-litert: one line that names the extra (runs in every tier)."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)          # import -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    for call in (lambda: export_litert({}, None, tmp_path, seq_len=8), lambda: LiteRTModel(tmp_path),
                 lambda: litert_greedy(tmp_path, [1], 1)):
        with pytest.raises(LiteRTUnavailable) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "pip install 'flaxchat[litert]'" in msg
        assert isinstance(err.value, RuntimeError)
