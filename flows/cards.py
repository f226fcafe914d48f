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
    """A training sink that keeps a Metaflow card current: progress, loss and val-bpb curves,
    throughput, and the latest samples. Refreshes at the loop's logging interval."""

    def __init__(self, card, title: str):
        self.card, self.title, self.total = card, title, 0
        self.train: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.progress = None

    def _build(self, total_steps: int) -> None:
        """Lay out the card once the loop has said how many steps it will run."""
        self.total = total_steps
        self.progress = ProgressBar(max=total_steps, label="steps", value=0)
        self.loss_chart = VegaChart(_line_chart("train loss", "loss", []))
        self.bpb_chart = VegaChart(_line_chart("val bits per byte", "val_bpb", []))
        self.status = Markdown("starting…")
        self.samples = Markdown("")
        for component in (Markdown(f"# {self.title}"), self.progress, self.status, self.loss_chart,
                          self.bpb_chart, self.samples):
            self.card.append(component)

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
            self.evals.append({"step": record["step"], "val_bpb": record["val_bpb"]})
            self.bpb_chart.update(_line_chart("val bits per byte", "val_bpb", self.evals))
        elif kind == "sample":
            lines = [f"- step {record['step']}: **{s['prompt']}**{s['completion']}" for s in record["samples"]]
            self.samples.update("### Samples\n" + "\n".join(lines).replace("\n\n", " "))
        elif kind == "info" and "message" in record:
            self.status.update(record["message"])
        self.card.refresh()


def pretrain_summary(manifest: dict[str, Any]) -> list:
    m = manifest["metrics"]
    return [
        Markdown(f"## Result: val bpb {_fmt(m['val_bpb_initial'] or 'n/a (resumed)')} → **{m['val_bpb']:.4f}** "
                 f"after {m['steps']} steps" + (f" (resumed from step {m['resumed_from_step']})"
                                                if m.get("resumed_from_step") else "")),
        metrics_table(m),
        Markdown(f"Checkpoint: `{manifest['checkpoint']['dir']}/{manifest['checkpoint']['step']}`"),
    ]
