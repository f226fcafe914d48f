"""Card builders for the pipeline flow: turn a stage manifest into Metaflow card components.

Kept apart from the flow so the flow reads like its DAG. Only small data goes into cards.
"""

from __future__ import annotations

from typing import Any

from metaflow.cards import Markdown, Table


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
