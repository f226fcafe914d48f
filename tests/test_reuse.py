"""flaxchat.reuse: stage keys follow exactly what determines a stage; the index hands back only finished outputs."""

import pytest

from flaxchat import reuse, storage
from flaxchat.config import build_config
from flaxchat.manifest import ManifestError, build_manifest, write_manifest

CODE = "code-v1"


def _keys(cfg, code=CODE):
    """Keys of the whole chain for one config, each stage keyed by its upstream's key."""
    d = cfg.to_dict()
    keys, upstream = {}, {}
    for stage, needs in (("tokenizer", ()), ("pretrain", ("tokenizer",)), ("sft", ("pretrain",)),
                         ("grpo", ("sft",)), ("eval", ("grpo",)), ("export", ("grpo",))):
        keys[stage] = reuse.stage_key(stage, d, {n: upstream[n] for n in needs}, code=code)
        upstream[stage] = {"stage": stage, "reuse_key": keys[stage]}
    return keys


def test_one_sft_knob_changes_sft_and_what_follows_only():
    base = _keys(build_config("demo"))
    changed = _keys(build_config("demo", overrides={"sft": {"init_lr_frac": 0.5}}))
    assert [s for s in base if base[s] != changed[s]] == ["sft", "grpo", "eval", "export"]
    assert _keys(build_config("demo")) == base                          # deterministic


def test_machine_local_knobs_do_not_change_keys_but_code_does():
    base = _keys(build_config("demo"))
    moved = _keys(build_config("demo", overrides={"data": {"cache_dir": "/elsewhere"},
                                                  "tasks": {"cache_dir": "/x"}, "eval": {"cache_dir": "/y"}}))
    assert moved == base
    assert all(base[s] != k for s, k in _keys(build_config("demo"), code="code-v2").items())
    assert len(reuse.code_version()) == 16 and reuse.code_version() == reuse.code_version()


def test_inputs_without_a_key_are_identified_by_their_file_checksums():
    a = {"stage": "pretrain", "files": {"x": "aa"}}
    assert reuse.input_digest(a) == reuse.input_digest(dict(a))
    assert reuse.input_digest(a) != reuse.input_digest({"stage": "pretrain", "files": {"x": "ab"}})
    with pytest.raises(ManifestError, match="neither a reuse_key nor file checksums"):
        reuse.input_digest({"stage": "pretrain", "uri": "/x"})
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        reuse.stage_key("train", {}, {})


@pytest.mark.parametrize("root_kind", ["local", "memory"])
def test_index_hands_back_only_finished_outputs(tmp_path, root_kind, capsys):
    root = str(tmp_path / "art") if root_kind == "local" else f"memory://reuse-test-{tmp_path.name}"
    out = storage.join(root, "FullPipelineFlow", "7", "sft")
    assert reuse.find(root, "sft", "k1") is None
    manifest = build_manifest("sft", out, {"val_loss": 0.5}, {}, {})
    write_manifest(manifest)
    reuse.record(root, "sft", "k1", manifest, run="FullPipelineFlow/7")
    found = reuse.find(root, "sft", "k1")
    assert found["metrics"] == {"val_loss": 0.5} and found["uri"] == out and found["reuse_key"] == "k1"
    assert found["reused_from"] == {"run": "FullPipelineFlow/7", "uri": out}
    assert "reused from run FullPipelineFlow/7" in reuse.describe(found)
    assert reuse.describe(manifest) is None
    assert reuse.find(root, "sft", "k2") is None and reuse.find(root, "grpo", "k1") is None
    # the output lost its manifest (deleted, half copied): not reused, and the log says why
    storage.remove_tree(out)
    assert reuse.find(root, "sft", "k1") is None
    assert "not usable" in capsys.readouterr().out
