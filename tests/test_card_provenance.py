"""flows/provenance.py: the section every stage card ends with (reuse, upstream runs, manifest, config)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flaxchat.config import build_config  # noqa: E402
from flows.provenance import provenance, run_of  # noqa: E402


def _text(components) -> str:
    return json.dumps([c.render() for c in components], default=str)


def test_run_of_reads_the_run_from_the_output_location():
    assert run_of({"uri": "/art/FullPipelineFlow/1234/sft"}, "FullPipelineFlow") == "1234"
    assert run_of({"uri": "gs://b/p/FullPipelineFlow/9/pretrain/"}, "FullPipelineFlow") == "9"
    assert run_of({"uri": "/tmp/standalone/sft"}, "FullPipelineFlow") is None


def test_section_names_upstream_runs_reuse_and_the_config_the_stage_read(monkeypatch):
    monkeypatch.setenv("METAFLOW_UI_URL", "https://mf.example.com/")
    cfg = build_config("demo", overrides={"sft": {"init_lr_frac": 0.5}}).to_dict()
    manifest = {"uri": "/art/FullPipelineFlow/12/sft", "files": {"a": "x", "b": "y"}, "reuse_key": "k123",
                "reused_from": {"run": "FullPipelineFlow/12", "uri": "/art/FullPipelineFlow/12/sft"}}
    inputs = {"pretrain": {"uri": "/art/FullPipelineFlow/11/pretrain"}}
    text = _text(provenance("sft", manifest, inputs, cfg, "FullPipelineFlow"))
    assert "reused from run FullPipelineFlow/12" in text
    assert "https://mf.example.com/FullPipelineFlow/11" in text            # link to the upstream run in the UI
    assert "sft.init_lr_frac" in text and "0.5" in text and "tasks.demo_problems" in text
    assert "pretrain.num_steps" not in text                                # only the sections sft reads
    assert "k123" in text


def test_fresh_output_without_ui_names_runs_as_pathspecs(monkeypatch):
    monkeypatch.delenv("METAFLOW_UI_URL", raising=False)
    cfg = build_config("demo").to_dict()
    text = _text(provenance("tokenizer", {"uri": "/art/FullPipelineFlow/3/tokenizer", "files": {}}, {}, cfg,
                            "FullPipelineFlow"))
    assert "reused" not in text and "FullPipelineFlow/3" in text and "tokenizer.vocab_size" in text
