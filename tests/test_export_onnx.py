"""ONNX export (flaxchat.export.onnx_export): onnxruntime logits and greedy ids equal gpt_forward's.

One tiny model with every feature live (GQA 6 query heads over 2 kv heads, value embeddings, smear
and backout non-zero, vocab 301 padded to 320, two short sliding windows below the test lengths) is
exported once per module; model.onnx is run at two sequence lengths (symbolic B and T), and the
decoder's prefill + single steps are checked against the full forward and against kv_cache.decode.
The export tests need jax2onnx and onnxruntime (the `onnx` extra) and skip without them; the
missing-dependency tests run everywhere (they block the imports themselves).
"""

import dataclasses
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxchat.config import ModelConfig
from flaxchat.export import onnx_export
from flaxchat.export.onnx_export import DECODER_FILE, MODEL_FILE, OnnxRunner, OnnxUnavailable, export_onnx, onnx_greedy
from flaxchat.model.kv_cache import init_cache, jit_decode
from flaxchat.model.gpt import ModelSpec, gpt_forward, init_params

VOCAB = 301          # not a multiple of 64: the padded lm_head columns must be sliced off
WINDOWS = (4, 64, 7)  # layers 0 and 2 see 5 and 8 keys; layer 1 is full causal
RTOL = 1e-4


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def tiny_model(seed: int = 0):
    cfg = ModelConfig(depth=3, aspect_ratio=32, head_dim=16, n_kv_head=2, sequence_len=64, vocab_size=VOCAB,
                      window_pattern="L", compute_dtype="float32")
    cfg.derive()
    spec = dataclasses.replace(ModelSpec.from_config(cfg, backend="cpu"), windows=WINDOWS)
    shapes = jax.eval_shape(lambda key: init_params(spec, key), jax.random.PRNGKey(0))   # shapes only: no compile
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim >= 2 else 1),
                                                jnp.float32), shapes)
    params["lm_head"] = params["lm_head"] * 3.0      # logits far from ties
    params["resid_lambdas"] = 1.0 + 0.1 * params["resid_lambdas"]
    params["smear_lambda"], params["backout_lambda"] = jnp.asarray(0.8), jnp.asarray(0.3)
    return params, spec


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    params, spec = tiny_model()
    out = tmp_path_factory.mktemp("onnx")
    desc = export_onnx(params, spec, str(out / MODEL_FILE), kv_cache=True)
    return params, spec, out, desc


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def test_manifest(exported):
    _, spec, out, desc = exported
    assert desc["files"] == [MODEL_FILE, DECODER_FILE] and desc["opset"] == 23
    assert sorted(os.listdir(out)) == [DECODER_FILE, MODEL_FILE]      # small model: no .onnx.data
    model = desc["graphs"][MODEL_FILE]
    assert model["inputs"] == [{"name": "input_ids", "dtype": "int32", "shape": ["B", "T"]}]
    assert model["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["B", "T", VOCAB]}]
    dec = desc["graphs"][DECODER_FILE]
    assert [i["name"] for i in dec["inputs"]] == ["input_ids", "k_cache", "v_cache", "pos", "prev_embed"]
    assert dec["inputs"][1]["shape"] == [spec.n_layer, "B", "S", spec.n_kv_head, spec.head_dim]
    assert [o["name"] for o in dec["outputs"]] == ["logits", "k_cache_out", "v_cache_out", "pos_out", "prev_embed_out"]
    assert [o["shape"] for o in dec["outputs"][1:]] == [i["shape"] for i in dec["inputs"][1:]]


def test_logits_parity_two_lengths(exported):
    params, spec, out, _ = exported
    runner = OnnxRunner(str(out / MODEL_FILE))
    forward = jax.jit(lambda ids: gpt_forward(params, spec, ids))
    rng = np.random.default_rng(1)
    for T in (9, 23):                    # one graph, two sequence lengths (both past the short windows)
        ids = rng.integers(0, VOCAB, (2, T))
        got, want = runner.logits(ids), np.asarray(forward(jnp.asarray(ids, jnp.int32)))
        assert got.shape == want.shape == (2, T, VOCAB)
        assert rel_err(got, want) <= RTOL, (T, rel_err(got, want))


def test_greedy_matches_jax(exported):
    params, spec, out, _ = exported
    n, prompt = 32, np.random.default_rng(2).integers(0, VOCAB, (2, 5))
    # reference: gpt_forward's argmax loop over one padded length (causal: the tail never matters)
    forward = jax.jit(lambda ids: gpt_forward(params, spec, ids))
    seq = np.zeros((2, prompt.shape[1] + n), np.int32)
    seq[:, :prompt.shape[1]] = prompt
    for t in range(prompt.shape[1], seq.shape[1]):
        seq[:, t] = np.argmax(np.asarray(forward(jnp.asarray(seq)))[:, t - 1], axis=-1)
    want = seq[:, prompt.shape[1]:]
    assert np.array_equal(onnx_greedy(str(out / MODEL_FILE), prompt, n), want)
    assert np.array_equal(onnx_greedy(str(out / DECODER_FILE), prompt, n), want)
    assert np.array_equal(onnx_greedy(str(out), prompt[0].tolist(), n, use_cache=True), want[0])


def test_decoder_steps_equal_full_forward(exported):
    params, spec, out, _ = exported
    runner = OnnxRunner(str(out))
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 20))
    want = np.asarray(jax.jit(lambda i: gpt_forward(params, spec, i))(jnp.asarray(ids, jnp.int32)))
    cache = runner.init_cache(2, 24)
    logits, cache = runner.decode(cache, ids[:, :6])                 # prefill a chunk
    assert rel_err(logits, want[:, :6]) <= RTOL
    # the cache the graph wrote equals flaxchat.model.kv_cache.decode's (the re-expressed write is exact)
    _, ref = jit_decode(spec)(params, init_cache(spec, 2, 24), jnp.asarray(ids[:, :6], jnp.int32))
    for name, field in (("k_cache", ref.k), ("v_cache", ref.v), ("pos", ref.pos), ("prev_embed", ref.prev_embed)):
        np.testing.assert_allclose(cache[name], np.asarray(field), rtol=1e-5, atol=1e-5, err_msg=name)
    for t in range(6, 20):                                          # then one token at a time
        logits, cache = runner.decode(cache, ids[:, t:t + 1])
        assert rel_err(logits[:, 0], want[:, t]) <= RTOL, t
    assert cache["pos"].tolist() == [20, 20]


def test_external_data(exported, tmp_path, monkeypatch):
    """Past the threshold (~1.8 GB in real use) the weights go to model.onnx.data; ORT still loads it."""
    params, spec, _, _ = exported
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    desc = export_onnx(params, spec, str(tmp_path / MODEL_FILE), kv_cache=False)
    assert desc["files"] == [MODEL_FILE, MODEL_FILE + ".data"] == sorted(os.listdir(tmp_path))
    assert os.path.getsize(tmp_path / MODEL_FILE) < 1_000_000 < os.path.getsize(tmp_path / (MODEL_FILE + ".data"))
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 7))
    want = np.asarray(jax.jit(lambda i: gpt_forward(params, spec, i))(jnp.asarray(ids, jnp.int32)))
    assert rel_err(OnnxRunner(str(tmp_path)).logits(ids), want) <= RTOL


def _fresh_module():
    """onnx_export executed anew under another name (the real module and its classes stay put)."""
    spec = importlib.util.spec_from_file_location("onnx_export_probe", onnx_export.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_dependencies_named(monkeypatch, tmp_path):
    for name in ("jax2onnx", "onnx_ir", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)                 # makes `import name` fail
    module = _fresh_module()                                        # importing needs neither package
    params, spec = tiny_model()
    with pytest.raises(module.OnnxUnavailable, match=r"jax2onnx .*pip install 'flaxchat\[onnx\]'"):
        module.export_onnx(params, spec, str(tmp_path / MODEL_FILE), kv_cache=False)
    with pytest.raises(OnnxUnavailable, match=r"onnxruntime .*pip install 'flaxchat\[onnx\]'"):
        OnnxRunner(str(tmp_path)).logits(np.zeros((1, 3), np.int64))
    assert not os.listdir(tmp_path)
