"""The report card: stage timings, cost, tokens, the metrics table beside nanochat's; the demo bundle."""

import csv
import json

import yaml

from flaxchat.eval.demo_bundle import TASKS, write_demo_bundle
from flaxchat.eval.report import build_report, metrics_rows, render_markdown


def _manifest(stage, **metrics):
    return {"stage": stage, "uri": f"/runs/1/{stage}", "metrics": metrics}


def test_report_gathers_stages_cost_and_metrics_beside_nanochat():
    manifests = {
        "tokenizer": _manifest("tokenizer", train_seconds=12.0),
        "pretrain": _manifest("pretrain", wall_seconds=3600.0, steps=100, total_batch_tokens=1024, final_loss=2.5),
        "sft": _manifest("sft", wall_seconds=1800.0, steps=10, total_batch_tokens=2048, final_loss=1.25),
        "grpo": _manifest("grpo", wall_seconds=588.0, steps=5, tokens_seen=777, final_loss=-0.01),
    }
    results = {"BASE": {"CORE": 0.2}, "SFT": {"ARC-Easy": 0.4, "GSM8K": 0.05, "ChatCORE": 0.09},
               "RL": {"GSM8K": 0.08}}
    report = build_report(manifests, results, depth=20, params={"total": 123}, git_revision="abc",
                          hourly_price_usd=24.0)
    assert report["total_wall_seconds"] == 6000.0
    assert abs(report["estimated_cost_usd"] - 40.0) < 1e-9
    assert report["stages"]["pretrain"]["tokens_seen"] == 102_400
    assert report["stages"]["grpo"]["tokens_seen"] == 777
    assert report["stages"]["tokenizer"]["wall_seconds"] == 12.0
    assert report["columns"] == ["CORE", "ARC-Easy", "GSM8K", "ChatCORE"]
    header, rows = metrics_rows(report)
    assert header == ["", "CORE", "ARC-Easy", "GSM8K", "ChatCORE"]
    assert rows[0] == ["BASE", "0.2000 (0.2219)", "–", "–", "–"]
    assert rows[1] == ["SFT", "–", "0.4000 (0.3876)", "0.0500 (0.0455)", "0.0900 (0.0884)"]
    assert rows[2] == ["RL", "–", "–", "0.0800 (0.0758)", "–"]
    text = render_markdown({**report, "isolation": "bwrap"})
    assert "| SFT | – | 0.4000 (0.3876) |" in text and "estimated cost $40.00 at $24.00/h" in text
    assert "| pretrain | 3600.0 | 100 | 102,400 | 2.5000 |" in text and "isolation: bwrap" in text
    json.dumps(report)  # JSON-able


def test_report_without_a_reference_depth_has_no_parentheses():
    report = build_report({"sft": _manifest("sft", wall_seconds=1.0)}, {"SFT": {"DemoMath": 0.5}}, depth=4,
                          params={"total": 1}, git_revision="x", hourly_price_usd=0.0)
    assert metrics_rows(report)[1] == [["SFT", "0.5000"]]


def test_demo_bundle_is_in_the_real_format(tmp_path):
    root = write_demo_bundle(str(tmp_path / "bundle"), seed=3, n=20)
    config = yaml.safe_load(open(f"{root}/core.yaml"))
    labels = [t["label"] for t in config["icl_tasks"]]
    assert labels == [t[0] for t in TASKS]
    with open(f"{root}/eval_meta_data.csv") as fh:
        baselines = {r["Eval Task"]: float(r["Random baseline"]) for r in csv.DictReader(fh)}
    assert baselines == {"demo_sounds": 25.0, "demo_homes": 25.0, "demo_calc": 0.0}
    for task in config["icl_tasks"]:
        items = [json.loads(line) for line in open(f"{root}/eval_data/{task['dataset_uri']}")]
        assert len(items) == 20 and isinstance(task["num_fewshot"], list)
        if task["icl_task_type"] == "multiple_choice":
            assert all(len(i["choices"]) == 4 and 0 <= i["gold"] < 4 for i in items)
            assert len({i["choices"][i["gold"]] for i in items}) > 1
        elif task["icl_task_type"] == "schema":
            assert all(len(i["context_options"]) == 4 and i["continuation"].endswith(".") for i in items)
        else:
            a, b = items[0]["context"].split(" = ")[0].split("*")
            assert items[0]["continuation"] == f"{int(a) * int(b)}>>{int(a) * int(b)}"
    again = write_demo_bundle(str(tmp_path / "other"), seed=3, n=20)
    assert open(f"{again}/eval_data/demo/demo_homes.jsonl").read() == open(f"{root}/eval_data/demo/demo_homes.jsonl").read()
