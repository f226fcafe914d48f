"""The Metaflow flow end to end on a tiny demo: run, inspect via the client, fail+resume.

Driven through `metaflow.Runner` with a private datastore, so nothing leaks between tests.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FLOW = str(ROOT / "flows" / "full_pipeline.py")

# Small enough to run in seconds, big enough for the tokenizer to learn merges.
TINY = {
    "tokenizer": {"vocab_size": 400, "max_chars": 400_000, "eval_chars": 20_000},
    "data": {"demo_documents": 600, "demo_val_documents": 60},
}


@pytest.fixture()
def mf_env(tmp_path, monkeypatch):
    env = {
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"),
        "METAFLOW_USER": "tester",
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _config_file(tmp_path, extra=None):
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _runner(mf_env, tmp_path, extra=None):
    from metaflow import Runner
    return Runner(FLOW, show_output=False, env=mf_env, cwd=str(tmp_path),
                  config=[("config", _config_file(tmp_path, extra))])


def test_demo_flow_produces_a_tokenizer_manifest(mf_env, tmp_path):
    from metaflow import Flow, namespace
    from metaflow.cards import get_cards

    from flaxchat.manifest import verify_files
    from flaxchat.tokenizer import Tokenizer

    with _runner(mf_env, tmp_path).run(preset="demo", artifact_root=str(tmp_path / "art")) as running:
        assert running.status == "successful", running.stderr
        run_id = running.run.id
    namespace(None)
    run = Flow("FullPipelineFlow")[run_id]
    assert {"depth:4", "preset:demo"} <= set(run.tags)
    assert any(t.startswith("git:") for t in run.tags)

    manifest = run["tokenizer"].task.data.tokenizer
    assert manifest["stage"] == "tokenizer"
    assert manifest["uri"].startswith(str(tmp_path / "art"))
    assert manifest["config"]["tokenizer"]["vocab_size"] == 400
    assert manifest["config"]["model"]["n_embd"] == 256
    assert manifest["metrics"]["bytes_per_token"] > 1.5
    verify_files(manifest)
    tok = Tokenizer.load(manifest["uri"])
    assert tok.vocab_size == 400
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"

    cards = get_cards(run["tokenizer"].task, id="tokenizer")
    html = cards[0].get()
    assert "bytes/token" in html


def test_failed_tokenizer_resumes_with_start_cloned(mf_env, tmp_path):
    """The data dir is empty on the first run (the tokenizer step fails); after we fill it,
    `resume` clones `start` and reruns only the tokenizer."""
    from metaflow import Flow, namespace

    from flaxchat.data.demo_corpus import write_demo_shards

    data_dir = tmp_path / "corpus"
    data_dir.mkdir()
    runner = _runner(mf_env, tmp_path, {"data": {"source": str(data_dir)}})
    with runner.run(preset="demo", artifact_root=str(tmp_path / "art")) as first:
        assert first.status == "failed"
        assert "no parquet files" in first.stderr or "no parquet" in first.stdout + first.stderr
        origin_id = first.run.id

    write_demo_shards(str(data_dir), seed=1, n_docs=400, n_val_docs=40)
    with runner.resume() as resumed:
        assert resumed.status == "successful", resumed.stderr
        new_id = resumed.run.id
    namespace(None)
    run = Flow("FullPipelineFlow")[new_id]
    assert new_id != origin_id
    start_meta = {m.name: m.value for m in run["start"].task.metadata}
    tok_meta = {m.name: m.value for m in run["tokenizer"].task.metadata}
    assert start_meta.get("origin-run-id") == origin_id      # cloned
    assert "origin-run-id" not in tok_meta                   # rerun
    manifest = run["tokenizer"].task.data.tokenizer
    # a rerun stage writes under its own run id, never into the origin run's outputs
    assert f"/{new_id}/tokenizer" in manifest["uri"]


def test_unknown_preset_fails_the_run_with_a_clear_error(mf_env, tmp_path):
    with _runner(mf_env, tmp_path).run(preset="gigantic", artifact_root=str(tmp_path / "art")) as running:
        assert running.status == "failed"
        out = running.stdout + running.stderr
    assert "unknown preset 'gigantic'" in out
    assert not (tmp_path / "art").exists()
