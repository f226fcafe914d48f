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


def _lines(uri):
    from flaxchat import storage
    return [json.loads(line) for line in storage.read_text(uri).splitlines()] if storage.exists(uri) else []


def test_remote_jsonl_is_rewritten_every_n_records_or_seconds_and_at_once_for_evals():
    import uuid
    from flaxchat import storage
    uri = f"memory://sinks-{uuid.uuid4().hex[:8]}/pretrain/metrics.jsonl"
    now = [0.0]
    sink = jsonl_sink(uri, flush_every_s=30, flush_every_records=3, clock=lambda: now[0])
    for step in (1, 2):
        sink("train", {**TRAIN, "step": step})
    assert _lines(uri) == []                                   # 2 pending < 3, 0 s < 30 s
    sink("train", {**TRAIN, "step": 3})
    assert [r["step"] for r in _lines(uri)] == [1, 2, 3]       # the third record writes
    sink("train", {**TRAIN, "step": 4})
    now[0] = 31.0
    sink("train", {**TRAIN, "step": 5})                        # 31 s since the last write
    assert [r["step"] for r in _lines(uri)] == [1, 2, 3, 4, 5]
    sink("sample", {"step": 5, "samples": [{"prompt": "a", "completion": "b"}]})
    assert _lines(uri)[-1]["kind"] == "sample"                 # samples/evals are not held back
    sink("train", {**TRAIN, "step": 6})
    assert len(_lines(uri)) == 6
    sink.finish()
    assert [r.get("step") for r in _lines(uri)] == [1, 2, 3, 4, 5, 5, 6]
    # a new sink on the same log continues it (a rerun in the same output, as a local file appends)
    again = jsonl_sink(uri, flush_every_records=1)
    again("train", {**TRAIN, "step": 7})
    assert [r["step"] for r in _lines(uri)] == [1, 2, 3, 4, 5, 5, 6, 7]
    storage.remove_tree(uri.rsplit("/", 2)[0])


def test_remote_jsonl_flush_policy_from_the_environment(monkeypatch):
    import uuid
    uri = f"memory://sinks-{uuid.uuid4().hex[:8]}/metrics.jsonl"
    monkeypatch.setenv("FLAXCHAT_LOG_FLUSH_RECORDS", "1")
    sink = jsonl_sink(uri)
    sink("train", TRAIN)
    assert len(_lines(uri)) == 1
    monkeypatch.setenv("FLAXCHAT_LOG_FLUSH_S", "soon")
    import pytest
    with pytest.raises(ValueError, match="FLAXCHAT_LOG_FLUSH_S='soon' is not a number"):
        jsonl_sink(uri)


def test_remote_jsonl_write_failure_warns_keeps_the_records_and_finish_raises(monkeypatch):
    import uuid

    import pytest

    from flaxchat import storage
    uri = f"memory://sinks-{uuid.uuid4().hex[:8]}/metrics.jsonl"
    sink = jsonl_sink(uri, flush_every_records=1)
    real_write = storage.write_text
    monkeypatch.setattr(storage, "write_text", lambda *a: (_ for _ in ()).throw(storage.Denied(f"cannot write {uri}")))
    with pytest.warns(UserWarning, match="metrics log not written"):
        sink("train", {**TRAIN, "step": 1})
    with pytest.raises(storage.Denied):
        sink.finish()
    monkeypatch.setattr(storage, "write_text", real_write)
    sink("train", {**TRAIN, "step": 2})                        # the store is back: nothing was lost
    assert [r["step"] for r in _lines(uri)] == [1, 2]
