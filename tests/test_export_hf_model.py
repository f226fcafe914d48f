"""The Hugging Face remote-code model (flaxchat/export/hf_modeling) equals our JAX GPT.

An export directory is written by hand (nanochat's state dict as model.safetensors, config.json from
hf_config_dict, the two modeling files), loaded with AutoModelForCausalLM(trust_remote_code=True),
and compared with flaxchat.model.gpt.gpt_forward (logits) and flaxchat.model.kv_cache (greedy decode) on tiny
random models where every feature is live: smear, backout, value embeddings, resid/x0 lambdas, a
padded vocab, GQA, and a short window (16) shorter than the sequences.
"""

import ast
import dataclasses
import functools
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flaxchat.config import ModelConfig  # noqa: E402
from flaxchat.export import layout  # noqa: E402
from flaxchat.export.hf_config import MODELING_FILES, hf_config_dict  # noqa: E402
from flaxchat.model.kv_cache import decode, init_cache  # noqa: E402
from flaxchat.model.gpt import ModelSpec, gpt_forward, init_params  # noqa: E402

pytestmark = pytest.mark.torch

VOCAB = 300            # padded to 320: the padded rows of wte/lm_head exist and must be sliced off
SEQ_LEN = 64
NEW_TOKENS = 32
RTOL = 1e-4            # max |hf - ours| / max |ours| over all logits


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def tiny(depth: int, n_kv_head: int, windows: tuple[int, ...], seed: int = 0):
    cfg = ModelConfig(depth=depth, aspect_ratio=32, head_dim=32, n_kv_head=n_kv_head, sequence_len=SEQ_LEN,
                      vocab_size=VOCAB, window_pattern="SL", compute_dtype="float32", attention_impl="xla")
    cfg.derive()
    spec = dataclasses.replace(ModelSpec.from_config(cfg), windows=windows)
    leaves, treedef = jax.tree.flatten(init_params(spec, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed + 1)
    p = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim >= 2 else 1),
                                                 jnp.float32) for x in leaves])
    p["lm_head"] = p["lm_head"] * 5.0      # logits far from ties, so greedy paths are stable
    p["resid_lambdas"] = 1.0 + 0.1 * p["resid_lambdas"]
    p["smear_lambda"], p["backout_lambda"] = jnp.asarray(0.8), jnp.asarray(0.3)
    return spec, p


MODELS = {"d3-gqa": dict(depth=3, n_kv_head=1, windows=(16, 64, 64)),
          "d4-mha": dict(depth=4, n_kv_head=4, windows=(16, 64, 16, 64))}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    spec, params = tiny(**MODELS[request.param])
    out = tmp_path_factory.mktemp(f"hf-{request.param}")
    safetensors_numpy.save_file(layout.to_state_dict(params, spec), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config_dict(spec, bos_token_id=VOCAB - 1, eos_token_id=None)))
    for f in MODELING_FILES:
        shutil.copy(f, out / f.name)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                                     output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return spec, params, model.eval()


def ids(seed, shape):
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape).astype(np.int64)


def hf_logits(model, idx, **kw):
    with torch.no_grad():
        return model(torch.from_numpy(idx), **kw).logits.numpy()


def rel_err(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@functools.cache
def _jit_decode(spec):
    return jax.jit(lambda params, cache, idx: decode(params, spec, cache, idx))


def greedy(spec, params, prompt, n):
    """Our greedy continuation of each (unpadded) prompt row through the KV-cache decode path."""
    step = _jit_decode(spec)
    cache = init_cache(spec, prompt.shape[0], prompt.shape[1] + n)
    logits, cache = step(params, cache, jnp.asarray(prompt, jnp.int32))
    out = []
    for _ in range(n):
        tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(np.asarray(tok))
        logits, cache = step(params, cache, tok[:, None])
    return np.stack(out, axis=1)


def test_config_and_state_dict_names(exported):
    spec, params, model = exported
    want = layout.expected_shapes(spec)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert not list(model.buffers())
    for key, value in layout.to_state_dict(params, spec).items():
        np.testing.assert_array_equal(model.state_dict()[key].numpy(), value, err_msg=key)
    cfg = model.config
    assert (cfg.model_type, cfg.window_sizes, cfg.padded_vocab_size, cfg.num_hidden_layers) == \
        ("flaxchat", list(spec.windows), spec.padded_vocab_size, spec.n_layer)


def test_modeling_files_import_only_torch_and_transformers():
    for f in MODELING_FILES:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert name.split(".")[0] in ("torch", "transformers"), f"{f.name} imports {name}"


def test_logits_match_gpt_forward(exported):
    spec, params, model = exported
    idx = ids(0, (2, 40))                   # T = 40 > the short window (16)
    want = np.asarray(gpt_forward(params, spec, jnp.asarray(idx, jnp.int32)))
    got = hf_logits(model, idx)
    assert got.shape == want.shape == (2, 40, VOCAB)
    err = rel_err(got, want)
    print(f"max relative logits error {err:.2e}")
    assert err < RTOL


def test_chunked_cache_matches_full_forward(exported):
    """Prefill 25 tokens, then 15 more through the same cache: smear at the chunk seam uses the
    cached previous embedding, attention the cached keys, windows the absolute positions."""
    spec, params, model = exported
    idx = ids(1, (2, 40))
    want = np.asarray(gpt_forward(params, spec, jnp.asarray(idx, jnp.int32)))
    with torch.no_grad():
        first = model(torch.from_numpy(idx[:, :25]), use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        second = model(torch.from_numpy(idx[:, 25:]), cache=cache, use_cache=True)
    got = np.concatenate([first.logits.numpy(), second.logits.numpy()], axis=1)
    assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_matches_ours(exported, use_cache):
    spec, params, model = exported
    prompt = ids(2, (2, 20))
    want = greedy(spec, params, prompt, NEW_TOKENS)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=use_cache, pad_token_id=0)
    np.testing.assert_array_equal(out[:, 20:].numpy(), want)


def test_left_padded_batch(exported):
    """A left-padded row gives its unpadded logits and greedy continuation, as if run alone."""
    spec, params, model = exported
    long, short = ids(3, (1, 24)), ids(4, (1, 13))
    pad = 24 - 13
    batch = np.concatenate([long, np.concatenate([np.zeros((1, pad), np.int64), short], axis=1)])
    mask = np.ones_like(batch)
    mask[1, :pad] = 0
    got = hf_logits(model, batch, attention_mask=torch.from_numpy(mask))
    for row, (prompt, start) in enumerate(((long, 0), (short, pad))):
        want = np.asarray(gpt_forward(params, spec, jnp.asarray(prompt, jnp.int32)))[0]
        assert rel_err(got[row, start:], want) < RTOL, row
    with torch.no_grad():
        out = model.generate(torch.from_numpy(batch), attention_mask=torch.from_numpy(mask), pad_token_id=0,
                             max_new_tokens=NEW_TOKENS, do_sample=False)
    for row, prompt in enumerate((long, short)):
        np.testing.assert_array_equal(out[row, 24:].numpy(), greedy(spec, params, prompt, NEW_TOKENS)[0], err_msg=str(row))


def test_labels_give_shifted_mean_loss(exported):
    spec, params, model = exported
    idx = ids(5, (2, 30))
    want = float(gpt_forward(params, spec, jnp.asarray(idx[:, :-1], jnp.int32), jnp.asarray(idx[:, 1:], jnp.int32)))
    with torch.no_grad():
        got = float(model(torch.from_numpy(idx), labels=torch.from_numpy(idx), use_cache=False).loss)
    assert abs(got - want) < 1e-4 * abs(want)
