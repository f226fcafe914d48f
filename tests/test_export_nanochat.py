"""nanochat's checkpoint format both ways, the import command, and the export stage's contract.

A tiny random model (every feature live) goes our tree -> nanochat's files -> imported stage output
-> export stage -> nanochat's files again; the parameters must come back bit for bit. Bad input
(wrong depth, missing tokenizer, unknown format, an output folder holding another export) fails
with one clear error and leaves nothing half-written.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from flaxchat.config import ConfigError, ModelConfig, build_config
from flaxchat.export import layout
from flaxchat.export.nanochat_format import STAGE_DIRS, read_checkpoint, read_tokenizer, write_checkpoint
from flaxchat.manifest import read_manifest, verify_files
from flaxchat.model.gpt import ModelSpec, init_params
from tiny_models import tiny_tokenizer


def tiny_config() -> ModelConfig:
    cfg = ModelConfig(depth=3, aspect_ratio=32, head_dim=32, sequence_len=64, vocab_size=300,
                      window_pattern="SL", compute_dtype="float32")
    cfg.derive()
    return cfg


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    spec = ModelSpec.from_config(cfg, backend="cpu")
    leaves, treedef = jax.tree.flatten(jax.jit(init_params, static_argnums=0)(spec, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [rng.normal(size=x.shape).astype(np.float32) * 0.3 for x in leaves])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _equal(a: dict, b: dict) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_state_dict_uses_nanochat_names_and_torch_layouts():
    cfg = tiny_config()
    spec = ModelSpec.from_config(cfg, backend="cpu")
    params = random_params(cfg)
    sd = layout.to_state_dict(params, spec)
    assert {k: v.shape for k, v in sd.items()} == layout.expected_shapes(spec)
    assert sorted(k for k in sd if k.startswith("value_embeds.")) == ["value_embeds.0.weight", "value_embeds.2.weight"]
    np.testing.assert_array_equal(sd["transformer.h.1.mlp.c_fc.weight"], params["blocks"]["mlp"]["c_fc"][1].T)
    np.testing.assert_array_equal(sd["transformer.h.2.attn.ve_gate.weight"], params["blocks"]["attn"]["ve_gate"][1].T)
    assert _equal(layout.from_state_dict(sd, spec), params)
    compiled = {layout.COMPILE_PREFIX + k: v for k, v in sd.items()}     # torch.compile'd checkpoints
    assert _equal(layout.from_state_dict(compiled, spec), params)


def test_model_config_maps_to_nanochat_and_back():
    cfg = tiny_config()
    back = layout.model_config_from_nanochat(layout.nanochat_model_config(cfg))
    assert (back.depth, back.n_embd, back.n_head, back.n_kv_head, back.sequence_len, back.vocab_size,
            back.window_pattern) == (3, 96, 3, 3, 64, 300, "SL")
    d20 = layout.model_config_from_nanochat({"sequence_len": 2048, "vocab_size": 32768, "n_layer": 20, "n_head": 10,
                                             "n_kv_head": 10, "n_embd": 1280})       # an old meta: no window
    assert (d20.n_embd, d20.head_dim, d20.window_pattern) == (1280, 128, "L")
    with pytest.raises(layout.LayoutError, match="not a multiple of n_head"):
        layout.model_config_from_nanochat({"sequence_len": 64, "vocab_size": 300, "n_layer": 2, "n_head": 5,
                                           "n_kv_head": 5, "n_embd": 96})


def test_checkpoint_round_trip_is_bitwise(tmp_path, tok):
    cfg, params = tiny_config(), random_params(tiny_config())
    written = write_checkpoint(params, cfg, tok, str(tmp_path), stage="sft", step=7)
    assert "chatsft_checkpoints/d3/model_000007.pt" in written and "tokenizer/tokenizer.pkl" in written
    meta = json.loads((tmp_path / "chatsft_checkpoints/d3/meta_000007.json").read_text())
    assert meta["model_config"] == layout.nanochat_model_config(cfg) and meta["step"] == 7
    back, back_cfg, _ = read_checkpoint(str(tmp_path / "chatsft_checkpoints/d3"))
    assert _equal(back, params) and back_cfg.n_embd == cfg.n_embd
    tok2 = read_tokenizer(str(tmp_path / "tokenizer"))
    text = "the cat sat on 123+45 mat"
    assert tok2.encode(text) == tok.encode(text) and tok2.special_tokens == tok.special_tokens


def test_checkpoint_whose_depth_disagrees_with_its_config_is_refused(tmp_path, tok):
    cfg, params = tiny_config(), random_params(tiny_config())
    write_checkpoint(params, cfg, tok, str(tmp_path), stage="pretrain", step=1)
    meta_path = tmp_path / "base_checkpoints/d3/meta_000001.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["n_layer"] = 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(layout.LayoutError, match="does not match a depth-4"):
        read_checkpoint(str(tmp_path / "base_checkpoints/d3"))
    meta["model_config"].update(n_layer=3, n_embd=128, n_head=4, n_kv_head=4)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(layout.LayoutError, match="depth/width disagree"):
        read_checkpoint(str(tmp_path / "base_checkpoints/d3"))


def test_tokenizer_pickle_that_runs_code_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))
    import pickle
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(layout.LayoutError, match="not a nanochat tokenizer pickle"):
        read_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tok):
    """A nanochat checkpoint of the tiny model, imported as a pretrain output."""
    from steps.import_nanochat import import_checkpoint
    root = tmp_path_factory.mktemp("nanochat")
    cfg = tiny_config()
    params = random_params(cfg)
    write_checkpoint(params, cfg, tok, str(root / "base"), stage="pretrain", step=5)
    out = root / "imported"
    manifest = import_checkpoint(str(root / "base/base_checkpoints/d3"), str(out))
    return params, manifest, root


def test_import_writes_a_pretrain_output_the_chat_loader_reads(imported, tok):
    from flaxchat.chat.loading import load_chat_model
    params, manifest, _ = imported
    assert manifest["stage"] == "pretrain" and manifest["checkpoint"]["step"] == 5
    verify_files(read_manifest(manifest["uri"]))
    loaded = load_chat_model(manifest["uri"])
    assert _equal(loaded.model.param_tree(), params)
    assert loaded.tokenizer.encode("a big red dog") == tok.encode("a big red dog")


def test_import_names_a_missing_tokenizer_and_writes_nothing(imported, tmp_path):
    from steps.import_nanochat import main
    _, _, root = imported
    out = tmp_path / "never"
    assert main(["--checkpoint", str(root / "base/base_checkpoints/d3"), "--tokenizer", str(tmp_path / "nope"),
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_export_stage_round_trips_through_nanochat_format(imported, tmp_path):
    from steps import export
    params, manifest, _ = imported
    cfg = build_config("demo", dotted=["export.formats=nanochat,hf"])
    out = tmp_path / "export"
    result = export.run(cfg, {"pretrain": manifest}, str(out))
    assert result["formats"]["nanochat"]["parity"] == {"round_trip_identical": True, "passed": True}
    back, _, _ = read_checkpoint(str(out / "nanochat" / STAGE_DIRS["pretrain"] / "d3"), 5)
    assert _equal(back, params)
    hf = result["formats"]["hf"]
    assert hf["status"] == "written" and not hf["builtin_nanochat"]["loadable"]
    assert {"hf/model.safetensors", "hf/config.json", "hf/modeling_flaxchat.py", "hf/tokenizer.json"} <= set(result["files"])
    from safetensors.numpy import load_file
    spec = ModelSpec.from_config(tiny_config(), backend="cpu")
    assert _equal(layout.from_state_dict(load_file(str(out / "hf/model.safetensors")), spec), params)
    verify_files(read_manifest(str(out)))
    # the same export again replaces it; another model's export into the same folder is refused
    export.run(cfg, {"pretrain": manifest}, str(out))
    other = dict(manifest, metrics={**manifest["metrics"], "params_sha256": "different"})
    with pytest.raises(export.ExportError, match="already holds a different export"):
        export.run(cfg, {"pretrain": other}, str(out))
    verify_files(read_manifest(str(out)))


def test_a_failing_format_publishes_nothing(imported, tmp_path, monkeypatch):
    from flaxchat.export import formats
    from steps import export
    _, manifest, _ = imported

    def broken(*_):
        raise RuntimeError("converter crashed")
    monkeypatch.setitem(formats.WRITERS, "hf", broken)
    monkeypatch.setattr(export, "WRITERS", formats.WRITERS)
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="converter crashed"):
        export.run(build_config("demo", dotted=["export.formats=nanochat,hf"]), {"pretrain": manifest}, str(out))
    assert not out.exists()


def test_unknown_format_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown format 'gguf'.*hf, nanochat, onnx, litert"):
        build_config("demo", dotted=["export.formats=hf,gguf"])


def test_chat_loader_takes_a_relative_path(imported, monkeypatch):
    """`--model artifacts/<run>/sft` as a user types it (orbax itself refuses relative paths)."""
    from flaxchat.chat.loading import load_chat_model
    params, manifest, _ = imported
    monkeypatch.chdir(os.path.dirname(manifest["uri"]))
    assert _equal(load_chat_model(os.path.basename(manifest["uri"])).model.param_tree(), params)


def _broken_copy(manifest: dict, dest, edit) -> dict:
    """A copy of a stage output with one thing wrong (its manifest rewritten to point at the copy)."""
    import shutil
    shutil.copytree(manifest["uri"], dest)
    m = json.loads((dest / "manifest.json").read_text().replace(manifest["uri"], str(dest)))
    edit(m, dest)
    (dest / "manifest.json").write_text(json.dumps(m))
    return m


def test_export_refuses_a_checkpoint_that_disagrees_with_its_config(imported, tmp_path):
    from flaxchat.chat.loading import LoadError
    from steps import export
    _, manifest, _ = imported
    bad = _broken_copy(manifest, tmp_path / "deeper", lambda m, _: m["config"]["model"].update(depth=4))
    with pytest.raises(LoadError, match="cannot restore the model"):
        export.run(build_config("demo", dotted=["export.formats=nanochat"]), {"pretrain": bad}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_names_a_missing_tokenizer(imported, tmp_path):
    import shutil
    from flaxchat.chat.loading import LoadError
    from steps import export
    _, manifest, _ = imported
    bad = _broken_copy(manifest, tmp_path / "notok", lambda m, d: shutil.rmtree(d / "tokenizer"))
    with pytest.raises((LoadError, ValueError), match="tokenizer"):
        export.run(build_config("demo", dotted=["export.formats=nanochat"]), {"pretrain": bad}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
