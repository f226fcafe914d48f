"""Training event sinks: console line, JSONL file, wandb (offline run files on disk)."""

import io
import json

from flaxchat.train.sinks import console_sink, jsonl_sink, wandb_sink

TRAIN = {"step": 10, "loss": 3.25, "tok_per_s": 1234.0, "step_s": 0.5, "lr_mult": 1.0, "mfu": 0.31}


def test_console_and_jsonl(tmp_path):
    out = io.StringIO()
    sink = console_sink(20, stream=out)
    sink("train", TRAIN)
    sink("eval", {"step": 10, "val_bpb": 1.5})
    sink("sample", {"step": 10, "samples": [{"prompt": "Hi", "completion": " there"}]})
    text = out.getvalue()
    assert "step 10/20 loss 3.2500" in text and "mfu 31.0%" in text and "val bpb 1.5000" in text
    assert "'Hi' -> ' there'" in text

    path = tmp_path / "m" / "metrics.jsonl"
    sink = jsonl_sink(str(path))
    sink("train", TRAIN)
    sink("eval", {"step": 10, "val_bpb": 1.5})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["kind"] == "train" and rows[0]["loss"] == 3.25 and rows[1]["val_bpb"] == 1.5


def test_wandb_offline_writes_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = wandb_sink("flaxchat-test", "unit", {"a": 1}, str(tmp_path))
    sink("train", TRAIN)
    sink("eval", {"step": 10, "val_bpb": 1.5})
    sink.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_disabled_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sink = wandb_sink("flaxchat-test", "unit", {}, str(tmp_path))
    sink("train", TRAIN)
    assert not (tmp_path / "wandb").exists()


def test_console_shows_every_eval_metric_and_rollout_statistics():
    out = io.StringIO()
    sink = console_sink(4, stream=out)
    sink("eval", {"step": 2, "pass@1": 0.25, "pass@4": 0.5, "examples": [{"prompt": "p"}]})
    sink("rollout", {"step": 2, "round": 2, "reward_mean": 0.375, "reward_std": 0.484, "sampled_len": 41.5,
                     "tool_calls": 1.25})
    text = out.getvalue()
    assert "eval @ 2: pass@1 0.2500, pass@4 0.5000" in text
    assert "rollout @ 2: reward 0.375±0.484, 41.5 tokens, 1.25 tool calls per sample" in text
