"""Import a nanochat checkpoint as a stage output, so nanochat's models can be fine-tuned here.

Reads nanochat's checkpoint folder (model_<step>.pt + meta_<step>.json, torch-free) and its
tokenizer (tokenizer.pkl) and writes what our stages hand each other: the tokenizer in our format,
an orbax checkpoint whose `model` subtree is the parameters in our layout, and a manifest whose
config is the chosen preset's with the model section nanochat's checkpoint implies. By default the
manifest is a `pretrain` output, the input of SFT:

    python -m steps.import_nanochat --checkpoint ~/.cache/nanochat/base_checkpoints/d20 \\
        --tokenizer ~/.cache/nanochat/tokenizer --out artifacts/imported/d20
    python -m steps.sft --preset climbmix --input pretrain=artifacts/imported/d20 --out artifacts/imported/sft
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import jax.numpy as jnp

from flaxchat import storage
from flaxchat.checkpoint import CHECKSUMS, CheckpointStore, tree_digest
from flaxchat.config import ConfigError, build_config
from flaxchat.export.nanochat_format import read_checkpoint, read_tokenizer
from flaxchat.manifest import MANIFEST_NAME, build_manifest

STAGES = ("pretrain", "sft", "grpo")


def import_checkpoint(checkpoint_dir: str, output_uri: str, *, tokenizer_dir: str | None = None,
                      step: int | None = None, stage: str = "pretrain", preset: str = "demo") -> dict[str, Any]:
    """Write an imported nanochat checkpoint as a `stage` output at `output_uri`; returns its manifest."""
    started = time.time()
    if stage not in STAGES:
        raise ConfigError(f"--as {stage!r}: choose one of {', '.join(STAGES)}")
    if storage.exists(storage.join(output_uri, MANIFEST_NAME)):
        raise ConfigError(f"{output_uri} already holds a stage output; choose another --out or remove it")
    output_uri = output_uri if storage.is_gcs(output_uri) else os.path.abspath(output_uri)  # orbax wants absolute
    checkpoint_dir = os.path.abspath(os.path.expanduser(checkpoint_dir))
    tokenizer_dir = os.path.abspath(os.path.expanduser(tokenizer_dir or _default_tokenizer_dir(checkpoint_dir)))
    params, model_cfg, meta = read_checkpoint(checkpoint_dir, step)
    tokenizer = read_tokenizer(tokenizer_dir)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but the checkpoint "
                          f"was trained with vocab_size={model_cfg.vocab_size}; pass the matching --tokenizer")
    model_section = {"depth": model_cfg.depth, "aspect_ratio": model_cfg.aspect_ratio,
                     "head_dim": model_cfg.head_dim, "n_kv_head": model_cfg.n_kv_head,
                     "sequence_len": model_cfg.sequence_len, "window_pattern": model_cfg.window_pattern}
    config = build_config(preset, overrides={"model": model_section,
                                             "tokenizer": {"vocab_size": tokenizer.vocab_size}})
    step = int(meta.get("step", 0) if step is None else step)
    tree = {"model": {k: _to_jax(v) for k, v in params.items()}}
    with tempfile.TemporaryDirectory(prefix="flaxchat-import-") as tmp:
        store = CheckpointStore(os.path.join(tmp, "checkpoints"), keep=1, async_save=False)
        store.save(step, tree, {"imported_from": checkpoint_dir})
        store.close()
        files = {f"tokenizer/{k}": v for k, v in tokenizer.save(os.path.join(tmp, "tokenizer")).items()}
        sums = json.loads(open(os.path.join(tmp, "checkpoints", str(step), CHECKSUMS)).read())
        files.update({f"checkpoints/{step}/{rel}": digest for rel, digest in sums.items()})
        metrics = {"steps": step, "val_bpb": meta.get("val_bpb"), "params_sha256": tree_digest(tree["model"]),
                   "wall_seconds": time.time() - started}
        manifest = build_manifest(stage, output_uri, metrics, config.to_dict(), files,
                                  checkpoint={"dir": storage.join(output_uri, "checkpoints"), "step": step},
                                  imported={"from": checkpoint_dir, "tokenizer": tokenizer_dir, "nanochat_meta": {
                                      k: v for k, v in meta.items() if k in ("step", "val_bpb", "model_config")}})
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True, default=float)
        storage.publish_dir(tmp, output_uri)
    return manifest


def _to_jax(value: Any) -> Any:
    return {k: _to_jax(v) for k, v in value.items()} if isinstance(value, dict) else jnp.asarray(value)


def _default_tokenizer_dir(checkpoint_dir: str) -> str:
    """nanochat keeps <base>/tokenizer beside <base>/<stage>_checkpoints/d<depth>."""
    return os.path.join(os.path.dirname(os.path.dirname(checkpoint_dir)), "tokenizer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m steps.import_nanochat", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="nanochat checkpoint folder (model_<step>.pt, meta_<step>.json)")
    p.add_argument("--tokenizer", default=None, help="nanochat tokenizer folder (default: <base dir>/tokenizer)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--as", dest="stage", default="pretrain", help="the stage the import stands for")
    p.add_argument("--preset", default="demo", help="config preset for the stages that follow")
    p.add_argument("--out", required=True, help="output uri (local folder or gs://)")
    args = p.parse_args(argv)
    try:
        manifest = import_checkpoint(args.checkpoint, args.out, tokenizer_dir=args.tokenizer, step=args.step,
                                     stage=args.stage, preset=args.preset)
    except ValueError as exc:       # LayoutError, ConfigError, TorchPickleError …
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("stage", "uri", "metrics", "checkpoint")}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
