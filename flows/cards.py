"""Card builders for the pipeline flow: turn a stage manifest into Metaflow card components.

Kept apart from the flow so the flow reads like its DAG. Only small data goes into cards.
"""

from __future__ import annotations

from typing import Any

from metaflow.cards import Markdown, ProgressBar, Table, VegaChart


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(metrics: dict[str, Any]) -> Table:
    return Table([[k, _fmt(v)] for k, v in metrics.items()], headers=["metric", "value"])


def tokenizer_card(manifest: dict[str, Any]) -> list:
    m = manifest["metrics"]
    pieces = manifest.get("sample", {}).get("pieces", [])
    shown = " | ".join(p.replace("|", "\\|").replace("\n", "\\n") for p in pieces)
    return [
        Markdown("# Tokenizer"),
        Markdown(f"Trained a {m['vocab_size']}-token BPE on {m['train_chars']:,} characters "
                 f"in {m['train_seconds']:.1f}s. Held-out text: **{m['bytes_per_token']:.3f} bytes/token** "
                 f"(raw bytes would be 1.0)."),
        metrics_table(m),
        Markdown(f"**Sample split** ({len(pieces)} tokens): `{shown}`"),
        Markdown(f"Outputs: `{manifest['uri']}`"),
    ]


def _line_chart(title: str, field: str, values: list[dict[str, Any]]) -> dict:
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": title, "width": 420, "height": 200,
        "data": {"values": values},
        "mark": {"type": "line", "point": True},
        "encoding": {"x": {"field": "step", "type": "quantitative"},
                     "y": {"field": field, "type": "quantitative", "scale": {"zero": False}}},
    }


class LiveTrainingCard:
    """A training sink that keeps a Metaflow card current: progress, the loss curve, one curve per
    eval metric in `eval_keys`, throughput, the latest samples; for GRPO also reward, sampled
    length and tool calls per round with graded example rollouts. Refreshes at each event."""

    ROLLOUT_KEYS = (("reward_mean", "reward (mean over samples)"), ("reward_std", "reward std within the batch"),
                    ("sampled_len", "sampled tokens per completion"), ("tool_calls", "tool calls per completion"))

    def __init__(self, card, title: str, eval_keys: tuple[tuple[str, str], ...] = (("val_bpb", "val bits per byte"),)):
        self.card, self.title, self.total, self.eval_keys = card, title, 0, eval_keys
        self.train: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.rollouts: list[dict[str, Any]] = []
        self.progress = None

    def _build(self, total_steps: int) -> None:
        """Lay out the card once the loop has said how many steps it will run."""
        self.total = total_steps
        self.progress = ProgressBar(max=total_steps, label="steps", value=0)
        self.loss_chart = VegaChart(_line_chart("train loss", "loss", []))
        self.eval_charts = {k: VegaChart(_line_chart(t, k, [])) for k, t in self.eval_keys}
        self.rollout_charts: dict[str, VegaChart] = {}
        self.status = Markdown("starting…")
        self.samples = Markdown("")
        for component in (Markdown(f"# {self.title}"), self.progress, self.status, self.loss_chart,
                          *self.eval_charts.values(), self.samples):
            self.card.append(component)

    def _rollout(self, record: dict[str, Any]) -> None:
        if not self.rollout_charts:
            self.rollout_charts = {k: VegaChart(_line_chart(t, k, [])) for k, t in self.ROLLOUT_KEYS}
            for chart in self.rollout_charts.values():
                self.card.append(chart)
        self.rollouts.append({k: record[k] for k in ("step", *dict(self.ROLLOUT_KEYS))})
        for key, title in self.ROLLOUT_KEYS:
            self.rollout_charts[key].update(_line_chart(title, key, self.rollouts))
        lines = [f"- reward {e['reward']:.2f} · **{e['prompt']}** → {e['completion']}" for e in record.get("examples", [])]
        self.samples.update(f"### Rollouts of round {record['round']}\n" + "\n".join(lines).replace("\n\n", " "))

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        if self.progress is None:
            if kind != "info" or "num_steps" not in record:
                return
            self._build(record["num_steps"])
        if kind == "train":
            self.train.append({"step": record["step"], "loss": record["loss"]})
            self.progress.update(record["step"])
            mfu = record.get("mfu")
            mfu_text = f", MFU {100 * mfu:.1f}%" if isinstance(mfu, float) and mfu == mfu else ""
            self.status.update(f"step {record['step']}/{self.total} · loss {record['loss']:.4f} · "
                               f"{record['tok_per_s']:,.0f} tok/s{mfu_text} · lr×{record['lr_mult']:.3f}")
            self.loss_chart.update(_line_chart("train loss", "loss", self.train))
        elif kind == "eval":
            self.evals.append({"step": record["step"], **{k: record[k] for k, _ in self.eval_keys if k in record}})
            for key, title in self.eval_keys:
                self.eval_charts[key].update(_line_chart(title, key, [e for e in self.evals if key in e]))
        elif kind == "rollout":
            self._rollout(record)
        elif kind == "sample":
            lines = [f"- step {record['step']}: **{s['prompt']}**{s['completion']}" for s in record["samples"]]
            self.samples.update("### Samples\n" + "\n".join(lines).replace("\n\n", " "))
        elif kind == "info" and "message" in record:
            self.status.update(record["message"])
        self.card.refresh()


def _before_after(m: dict[str, Any], key: str, label: str) -> str:
    before = m.get(f"{key}_initial")
    before_text = "n/a (resumed)" if before is None else _fmt(before)
    return f"{label} {before_text} → **{_fmt(m.get(key))}**"


def _result(manifest: dict[str, Any], parts: list[str]) -> Markdown:
    m = manifest["metrics"]
    resumed = f" (resumed from step {m['resumed_from_step']})" if m.get("resumed_from_step") else ""
    return Markdown(f"## Result: {', '.join(parts)} after {m['steps']} steps{resumed}")


def _checkpoint(manifest: dict[str, Any]) -> Markdown:
    return Markdown(f"Checkpoint: `{manifest['checkpoint']['dir']}/{manifest['checkpoint']['step']}`")


def pretrain_summary(manifest: dict[str, Any]) -> list:
    m = manifest["metrics"]
    return [_result(manifest, [_before_after(m, "val_bpb", "val bpb")]), metrics_table(m), _checkpoint(manifest)]


def sft_summary(manifest: dict[str, Any]) -> list:
    m = manifest["metrics"]
    parts = [_before_after(m, "val_loss", "held-out loss"), _before_after(m, "greedy_accuracy", "greedy accuracy")]
    return [_result(manifest, parts), metrics_table(m), _checkpoint(manifest)]


def grpo_summary(manifest: dict[str, Any]) -> list:
    m = manifest["metrics"]
    k = next((key for key in m if key.startswith("pass@") and key != "pass@1" and not key.endswith("_initial")), None)
    parts = [_before_after(m, "pass@1", "held-out pass@1")] + ([_before_after(m, k, k)] if k else [])
    rows = [[r["round"], _fmt(r["reward_mean"]), _fmt(r["sampled_len"]), _fmt(r["tool_calls"])]
            for r in manifest.get("rollouts", [])]
    return [_result(manifest, parts), metrics_table(m),
            Table(rows, headers=["round", "reward mean", "sampled tokens", "tool calls"]), _checkpoint(manifest)]


def eval_card(manifest: dict[str, Any]) -> list:
    """The run's report card: metrics table (ours beside nanochat's), wall time per stage, CORE tasks."""
    from flaxchat.eval.report import metrics_rows
    report = manifest["report"]
    env = report["environment"]
    header, rows = metrics_rows(report)
    stages = [{"stage": name, "seconds": s["wall_seconds"] or 0.0} for name, s in report["stages"].items()]
    chart = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": "wall time per stage (s)",
             "width": 420, "height": 160, "data": {"values": stages}, "mark": "bar",
             "encoding": {"y": {"field": "stage", "type": "nominal", "sort": None},
                          "x": {"field": "seconds", "type": "quantitative"}}}
    stage_rows = [[name, _fmt(s["wall_seconds"]), _fmt(s["steps"]), _fmt(s["tokens_seen"]), _fmt(s["final_loss"])]
                  for name, s in report["stages"].items()]
    out = [
        Markdown(f"# Report card — d{report['depth']}"),
        Markdown(f"{env['devices']} · jax {env['versions'].get('jax')} · flax {env['versions'].get('flax')} · "
                 f"git {env['git_revision']} · {report['total_wall_seconds'] / 60:.1f} min · estimated cost "
                 f"${report['estimated_cost_usd']:.2f} at ${report['hourly_price_usd']:.2f}/h · code graded with "
                 f"`{report.get('isolation', 'n/a')}` isolation"),
        Markdown("## Metrics (nanochat's figure for this depth in parentheses)"),
        Table(rows, headers=header),
        Markdown("## Stages"),
        Table(stage_rows, headers=["stage", "wall s", "steps", "tokens seen", "final loss"]),
        VegaChart(chart),
        Table([[k, f"{v:,}"] for k, v in report["parameters"].items()], headers=["parameters", "count"]),
    ]
    core = report.get("details", {}).get("BASE")
    if core:
        out += [Markdown("## CORE tasks"),
                Table([[label, _fmt(r.get("accuracy")), _fmt(r.get("centered"))] for label, r in core.items()],
                      headers=["task", "accuracy", "centered"])]
    return out


def export_card(manifest: dict[str, Any]) -> list:
    """One row per format: written or skipped, its parity figures against the JAX model, its files."""
    src = manifest["source"]
    rows = []
    for name, f in manifest["formats"].items():
        parity = f.get("parity", {})
        if f["status"] != "written":
            check = f["reason"]
        elif "skipped" in parity:
            check = f"written; not checked: {parity['skipped']}"
        elif "round_trip_identical" in parity:
            check = f"round trip identical: {parity['round_trip_identical']}"
        else:
            check = (f"max rel. logits error {parity['max_rel_err']:.2e}; greedy {parity['greedy_tokens']} tokens "
                     f"{'identical' if parity['greedy_match'] else 'differ'}")
        files = sorted(p for p in manifest["files"] if p.startswith(f"{name}/"))
        rows.append([name, f["status"], check, f"{len(files)} files"])
    builtin = manifest["formats"].get("hf", {}).get("builtin_nanochat")
    out = [Markdown(f"# Export — {src['stage']} step {src['step']}"),
           Markdown(f"From `{src['uri']}` to `{manifest['uri']}`; each file's sha256 is in the manifest."),
           Table(rows, headers=["format", "status", "checked against JAX", "files"])]
    if builtin is not None and not builtin["loadable"]:
        out.append(Markdown("transformers' built-in `NanoChatForCausalLM` cannot run this model (so no config for "
                            "it is written; load with `trust_remote_code=True`): " + "; ".join(builtin["why_not"])))
    return out
