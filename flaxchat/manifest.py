"""Stage manifests: the only thing one stage hands to the next.

A manifest is a small JSON-able dict: where the stage's outputs live (`uri`), what it
measured (`metrics`), the fully resolved config it ran with, and a sha256 for every file
it wrote under `uri`. It is stored as a Metaflow artifact (so the UI stays fast) and also
written as `manifest.json` under `uri`, LAST, so a directory without a manifest is by
definition unfinished and is never picked up by a consumer.

Consumers read paths only from manifests, never rebuild them from their own run id:
after `resume`, cloned steps keep pointing at the origin run's outputs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flaxchat import storage

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A missing, unreadable or inconsistent stage manifest."""


def build_manifest(stage: str, uri: str, metrics: dict[str, Any], config: dict[str, Any],
                   files: dict[str, str], **extra: Any) -> dict[str, Any]:
    """`files` maps paths relative to `uri` to their sha256."""
    return {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "uri": uri,
        "metrics": dict(metrics),
        "config": config,
        "files": dict(sorted(files.items())),
        "created_unix": time.time(),
        **extra,
    }


def write_manifest(manifest: dict[str, Any]) -> str:
    """Write `manifest.json` under the manifest's uri (atomically); returns its location."""
    target = storage.join(manifest["uri"], MANIFEST_NAME)
    storage.write_text(target, json.dumps(manifest, indent=2, sort_keys=True, default=float))
    return target


def read_manifest(uri: str) -> dict[str, Any]:
    """Load the manifest of a finished stage output directory (or a manifest.json path)."""
    path = uri if uri.endswith(".json") else storage.join(uri, MANIFEST_NAME)
    if not storage.exists(path):
        raise ManifestError(
            f"no {MANIFEST_NAME} at {path}: the stage that writes {uri} did not finish; rerun or resume it")
    try:
        manifest = json.loads(storage.read_text(path))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is not a readable manifest ({exc}); rerun the stage that wrote it") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {manifest.get('format_version')!r}, "
                            f"this flaxchat reads {FORMAT_VERSION}; rerun the stage with this version")
    return manifest


def require(inputs: dict[str, dict[str, Any]], stage: str) -> dict[str, Any]:
    """The upstream manifest a stage needs, with a clear error if the flow did not pass it."""
    if stage not in inputs or not inputs[stage]:
        raise ManifestError(f"missing input manifest '{stage}'; pass it (flow artifact or --input {stage}=URI)")
    return inputs[stage]


def verify_files(manifest: dict[str, Any], local_dir: str | None = None) -> None:
    """Recompute each file's sha256 (under `local_dir` if it was fetched there, else under uri)."""
    root = local_dir or manifest["uri"]
    for rel, expected in manifest["files"].items():
        path = storage.join(root, rel)
        if not storage.exists(path):
            raise ManifestError(f"{path} listed in the {manifest['stage']} manifest is missing; rerun that stage")
        actual = storage.sha256_file(path)
        if actual != expected:
            raise ManifestError(f"{path} fails its checksum (manifest {expected[:12]}…, file {actual[:12]}…): "
                                f"it was modified after the {manifest['stage']} stage wrote it; rerun that stage")
