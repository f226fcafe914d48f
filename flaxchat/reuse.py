"""Reuse finished stages: a stage's output is keyed by what determines it.

The key of a stage is a digest of (1) the config sections that stage reads, minus machine-local
knobs such as cache directories, (2) the keys of its input manifests (or, for a manifest made
outside a flow, the sha256 of every file it names), and (3) the code version: a digest of the
library and stage sources. Change one SFT knob and only SFT and what consumes it get new keys.
The code version is deliberately coarse (any source change recomputes every stage): a stale reuse
would silently hand out a model the current code would not have produced.

A finished stage is recorded in a small index under the artifact root,
`<root>/reuse/<stage>/<key>.json` -> {"uri", "run"}, written only after the stage's own manifest was
published. Lookups go through `read_manifest`, so an output whose manifest is missing (deleted,
half-copied) is never reused. Two runs computing the same stage at once each write their own
output directory and publish it atomically; the index then names whichever finished last, and both
outputs are complete. (This is marin's executor idea — a step's output named by what determines
it — on top of Metaflow's per-run outputs.)
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from flaxchat import storage
from flaxchat.manifest import ManifestError, read_manifest

# The config sections each stage's output depends on.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("seed", "tokenizer", "data"),
    "pretrain": ("seed", "model", "data", "mesh", "pretrain"),
    "sft": ("seed", "mesh", "tasks", "sft"),
    "grpo": ("seed", "mesh", "tasks", "rl", "grpo"),
    "eval": ("seed", "eval"),
    "export": ("export",),
}
# Knobs that say where or how patiently to fetch things, not what is computed.
MACHINE_LOCAL = {"cache_dir", "download_timeout_s", "download_retries"}
INDEX_DIR = "reuse"
_SOURCE_ROOTS = ("flaxchat", "steps")


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the library's and stages' Python sources (paths and bytes), 16 hex digits."""
    repo = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for root in _SOURCE_ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in MACHINE_LOCAL}
    return node


def input_digest(manifest: dict[str, Any]) -> str:
    """What identifies an input: its own reuse key, else the content of the files it names."""
    if manifest.get("reuse_key"):
        return manifest["reuse_key"]
    files = manifest.get("files")
    if not files:
        raise ManifestError(f"manifest of stage {manifest.get('stage')!r} at {manifest.get('uri')} has neither a "
                            "reuse_key nor file checksums: it cannot key a downstream stage")
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def stage_key(stage: str, config: dict[str, Any], inputs: dict[str, dict[str, Any]],
              code: str | None = None) -> str:
    """The digest that names a stage's output; `config` is the resolved config as a dict."""
    if stage not in STAGE_SECTIONS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_SECTIONS)}")
    determined_by = {
        "stage": stage,
        "config": {name: _strip(config.get(name)) for name in STAGE_SECTIONS[stage]},
        "inputs": {name: input_digest(m) for name, m in sorted(inputs.items())},
        "code": code or code_version(),
    }
    return hashlib.sha256(json.dumps(determined_by, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _index_uri(artifact_root: str, stage: str, key: str) -> str:
    return storage.join(artifact_root, INDEX_DIR, stage, f"{key}.json")


def find(artifact_root: str, stage: str, key: str) -> dict[str, Any] | None:
    """The finished output recorded for this key, as its manifest plus `reused_from`, or None.
    An index entry whose output is gone or unfinished is ignored (and says so)."""
    index = _index_uri(artifact_root, stage, key)
    try:
        entry = json.loads(storage.read_text(index))
    except storage.NotFound:
        return None
    except (OSError, ValueError) as exc:
        print(f"warning: reuse index {index} unreadable ({exc}); computing {stage}")
        return None
    try:
        manifest = read_manifest(entry["uri"])
    except (ManifestError, OSError, KeyError) as exc:
        print(f"warning: {stage} output recorded for key {key} is not usable ({exc}); computing it again")
        return None
    return manifest | {"reuse_key": key, "reused_from": {"run": entry.get("run"), "uri": entry["uri"]}}


def record(artifact_root: str, stage: str, key: str, manifest: dict[str, Any], run: str) -> None:
    """Register a finished stage's output under its key (after its manifest is published)."""
    entry = {"uri": manifest["uri"], "run": run, "stage": stage, "key": key}
    storage.write_text(_index_uri(artifact_root, stage, key), json.dumps(entry, indent=2))


def describe(manifest: dict[str, Any]) -> str | None:
    """One line for cards and logs when a manifest was reused, else None."""
    source = manifest.get("reused_from")
    if not source:
        return None
    return f"reused from run {source.get('run')} ({source['uri']}): same config, inputs and code"

