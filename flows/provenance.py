"""The provenance section every stage card ends with: where the output came from and what made it.

A stage card first shows what the stage did (flows/cards.py); this section adds what a reader needs
to trust or reproduce it: whether it was reused from an earlier run, the upstream stages' runs (links
into the Metaflow UI when METAFLOW_UI_URL is set), the output's manifest (location, files, reuse key,
code version) and the resolved config sections the stage read.
"""

from __future__ import annotations

import os
from typing import Any

from metaflow.cards import Markdown, Table

from flaxchat import reuse


def run_of(manifest: dict[str, Any], flow_name: str) -> str | None:
    """The run that wrote a manifest's output: outputs live at <root>/<flow>/<run_id>/<stage>."""
    parts = manifest.get("uri", "").rstrip("/").split("/")
    if len(parts) >= 3 and parts[-3] == flow_name:
        return parts[-2]
    return None


def _run_link(flow_name: str, run_id: str | None) -> str:
    """Plain text: table cells do not render Markdown. With the UI configured, its URL for the run."""
    if run_id is None:
        return "outside a flow"
    ui = os.environ.get("METAFLOW_UI_URL", "").rstrip("/")
    return f"{flow_name}/{run_id} ({ui}/{flow_name}/{run_id})" if ui else f"{flow_name}/{run_id}"


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [item for k, v in node.items() for item in _flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), node)]


def provenance(stage: str, manifest: dict[str, Any], inputs: dict[str, dict[str, Any]], config: dict[str, Any],
               flow_name: str) -> list:
    """Card components: reuse, upstream runs, this output's manifest, the config sections it read."""
    out = [Markdown("## Provenance")]
    reused = reuse.describe(manifest)
    if reused:
        out.append(Markdown(f"**This stage was {reused}.**"))
    if inputs:
        rows = [[name, _run_link(flow_name, run_of(m, flow_name)), str(m.get("uri"))] for name, m in inputs.items()]
        out += [Markdown("Upstream stages"), Table(rows, headers=["stage", "run", "output"])]
    files = manifest.get("files", {})
    facts = [["output", str(manifest.get("uri"))], ["written by run", _run_link(flow_name, run_of(manifest, flow_name))],
             ["files (sha256 in the manifest)", str(len(files))],
             ["reuse key", str(manifest.get("reuse_key", "-"))], ["code version", reuse.code_version()]]
    out += [Markdown("Manifest"), Table(facts, headers=["", ""])]
    sections = reuse.STAGE_SECTIONS.get(stage, ())
    rows = [[key, str(value)] for name in sections for key, value in _flatten(config.get(name), f"{name}.")]
    if rows:
        out += [Markdown(f"Resolved config ({', '.join(sections)})"), Table(rows, headers=["key", "value"])]
    return out
