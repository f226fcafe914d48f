"""The run's report card: what was trained, on what, for how long and cost, and how well it scores.

`build_report` gathers, from the stage manifests and the eval results, a JSON-able dict:
environment (devices, library versions, git revision), wall time per stage and its estimated cost
at a configurable hourly price, parameter counts, tokens seen per training stage, final losses, and
the metrics table (rows BASE / SFT / RL, one column per metric) with nanochat's published figures
for the same depth beside ours where they exist. `render_markdown` turns it into `report.md`.
"""

from __future__ import annotations

import platform
import time
from typing import Any

# nanochat's published results (README / report of the d20 "speedrun"), keyed by depth and row.
NANOCHAT_REFERENCE: dict[int, dict[str, dict[str, float]]] = {
    20: {
        "BASE": {"CORE": 0.2219},
        "SFT": {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455,
                "HumanEval": 0.0854, "ChatCORE": 0.0884},
        "RL": {"GSM8K": 0.0758},
    },
}
ROWS = ("BASE", "SFT", "RL")
STAGE_OF_ROW = {"BASE": "pretrain", "SFT": "sft", "RL": "grpo"}


def environment(git_revision: str) -> dict[str, Any]:
    import jax
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for pkg in ("jax", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "absent"
    return {"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "backend": jax.default_backend(),
            "processes": jax.process_count(), "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "git_revision": git_revision}


def _tokens_seen(manifest: dict[str, Any]) -> int | None:
    m = manifest.get("metrics", {})
    if m.get("total_batch_tokens") and m.get("steps"):
        return int(m["total_batch_tokens"]) * int(m["steps"])
    return m.get("tokens_seen")


def build_report(manifests: dict[str, dict[str, Any]], results: dict[str, dict[str, float]], *,
                 depth: int, params: dict[str, int], git_revision: str, hourly_price_usd: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`manifests`: stage name -> manifest (whichever stages ran); `results`: row -> metric -> value."""
    stages = {}
    for name, manifest in manifests.items():
        m = manifest.get("metrics", {})
        wall = m.get("wall_seconds", m.get("train_seconds"))
        stages[name] = {"wall_seconds": wall, "steps": m.get("steps"), "tokens_seen": _tokens_seen(manifest),
                        "final_loss": m.get("final_loss"), "uri": manifest.get("uri")}
    total_s = sum(s["wall_seconds"] or 0.0 for s in stages.values())
    columns: list[str] = []
    for row in ROWS:
        for key in results.get(row, {}):
            if key not in columns:
                columns.append(key)
    reference = NANOCHAT_REFERENCE.get(depth, {})
    return {
        "created_unix": time.time(), "depth": depth, "environment": environment(git_revision),
        "parameters": params, "stages": stages,
        "total_wall_seconds": total_s, "hourly_price_usd": hourly_price_usd,
        "estimated_cost_usd": total_s / 3600.0 * hourly_price_usd,
        "columns": columns, "metrics": {row: results[row] for row in ROWS if row in results},
        "nanochat_reference": {row: {k: v for k, v in reference.get(row, {}).items()} for row in ROWS
                               if reference.get(row)},
        **(extra or {}),
    }


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def metrics_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the metrics table; nanochat's figure for the same depth in parentheses."""
    cols, ref = report["columns"], report["nanochat_reference"]
    rows = []
    for row in ROWS:
        if row not in report["metrics"]:
            continue
        cells = [row]
        for col in cols:
            ours = report["metrics"][row].get(col)
            theirs = ref.get(row, {}).get(col)
            cells.append(_num(ours) + (f" ({theirs:.4f})" if theirs is not None else ""))
        rows.append(cells)
    return ["", *cols], rows


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# flaxchat report card — d{report['depth']}", "",
             f"- devices: {env['devices']} ({env['backend']}, {env['processes']} process(es))",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f", python {env['python']}",
             f"- git revision: {env['git_revision']}",
             f"- parameters: " + ", ".join(f"{k} {v:,}" for k, v in report["parameters"].items()),
             f"- wall time: {report['total_wall_seconds'] / 60:.1f} min; estimated cost "
             f"${report['estimated_cost_usd']:.2f} at ${report['hourly_price_usd']:.2f}/h", "",
             "## Stages", "", "| stage | wall s | steps | tokens seen | final loss |", "| --- | --- | --- | --- | --- |"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {_num(s['wall_seconds'], 1)} | {_num(s['steps'])} | {_num(s['tokens_seen'])} | "
                     f"{_num(s['final_loss'])} |")
    header, rows = metrics_rows(report)
    lines += ["", "## Metrics", "", "nanochat's published figure for the same depth in parentheses, where it exists.",
              "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for key in ("isolation", "notes"):
        if report.get(key):
            lines += ["", f"{key}: {report[key]}"]
    return "\n".join(lines) + "\n"
