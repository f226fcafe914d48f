"""What every stage module shares: its CLI, output locations and error reporting.

A stage is `run(config, inputs, output_uri) -> manifest`. The flow calls `run` directly;
`python -m steps.<stage>` goes through `main`, which builds the same config tree from the
same flags (preset, depth, YAML overrides, dotted overrides), reads upstream manifests
from `--input stage=URI`, and prints the manifest as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import yaml

from flaxchat import storage
from flaxchat.config import ConfigError, PipelineConfig, build_config
from flaxchat.manifest import read_manifest

StageFn = Callable[[PipelineConfig, dict[str, dict[str, Any]], str], dict[str, Any]]


def absolute_uri(uri: str) -> str:
    """A local path made absolute against the working directory (gs:// URIs as they are). Every path
    a CLI takes goes through here: orbax refuses relative checkpoint paths, and a manifest is read
    later from other directories and other machines, so it must never record a relative one."""
    return uri if storage.is_gcs(uri) else os.path.abspath(os.path.expanduser(uri))


def stage_uri(artifact_root: str, run_key: str, stage: str) -> str:
    """Where a stage of a run writes: <artifact_root>/<run_key>/<stage>."""
    return storage.join(artifact_root, run_key, stage)


def load_overrides(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_args(stage: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m steps.{stage}", description=f"Run the {stage} stage alone.")
    p.add_argument("--preset", default="demo")
    p.add_argument("--depth", type=int, default=None, help="model depth (default: the preset's)")
    p.add_argument("--config", default=None, help="YAML file of config overrides")
    p.add_argument("--set", dest="dotted", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set pretrain.num_steps=20 (repeatable)")
    p.add_argument("--artifact-root", default=None, help="local directory (relative to here) or gs://bucket/prefix")
    p.add_argument("--out", default=None, help="output uri, a local path (relative to here) or gs:// "
                   "(default: <artifact-root>/standalone-<time>/<stage>)")
    p.add_argument("--input", action="append", default=[], metavar="STAGE=URI",
                   help="an upstream stage's output uri, local (relative to here) or gs:// (its manifest.json is read)")
    return p.parse_args(argv)


def main(stage: str, run: StageFn, argv: list[str] | None = None) -> int:
    """CLI entry point shared by all stage modules; one-line errors, non-zero exit."""
    args = parse_args(stage, argv)
    try:
        cfg = build_config(args.preset, depth=args.depth, overrides=load_overrides(args.config),
                           dotted=args.dotted, artifact_root=args.artifact_root)
        cfg.artifact_root = absolute_uri(cfg.artifact_root)   # recorded in the manifest's config
        inputs = {}
        for item in args.input:
            name, sep, uri = item.partition("=")
            if not sep:
                raise ConfigError(f"--input {item!r} must look like STAGE=URI")
            inputs[name] = read_manifest(absolute_uri(uri))
        out = args.out or stage_uri(cfg.artifact_root, f"standalone-{time.strftime('%Y%m%d-%H%M%S')}", stage)
        manifest = run(cfg, inputs, absolute_uri(out))
    except ValueError as exc:  # ConfigError, DataError, ManifestError, TokenizerFormatError …
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2, default=float))
    return 0
