"""Load a trained model + tokenizer for chatting, from a stage's output (its manifest).

A stage that trains a model (pretrain, later SFT/RL) writes `<uri>/manifest.json` with the
resolved config (`config`), the checkpoint to use (`checkpoint: {dir, step}`) and the tokenizer
files under `<uri>/tokenizer/` (else `tokenizer_uri`). Training checkpoints hold
`{"model": ..., "optimizer": ...}`; chatting needs only the model, so orbax is asked for that
subtree alone (`partial_restore`): the optimizer state (twice the model's size) is never read,
and no optimizer has to be rebuilt to describe it. The model is built abstractly
(`nnx.eval_shape`), so loading never spends time or memory on a random init.

Paths are taken from the manifest; if the stage directory was moved (the manifest's own `uri`
no longer exists), the tokenizer and checkpoints are looked up next to the manifest instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from flaxchat import storage
from flaxchat.config import PipelineConfig
from flaxchat.manifest import MANIFEST_NAME, read_manifest, verify_files
from flaxchat.model.gpt import GPT
from flaxchat.tokenizer import META_FILE, Tokenizer


class LoadError(ValueError):
    """A model that cannot be loaded for chat; the message names the path and the fix."""


@dataclasses.dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    config: PipelineConfig
    manifest: dict[str, Any]
    step: int


def _stage_dir(source: str) -> str:
    """The directory holding the manifest (source may be that directory or the manifest.json)."""
    source = str(source).rstrip("/")
    if source.endswith(".json"):
        source = source.rsplit("/", 1)[0] if "/" in source else "."
    # orbax refuses relative checkpoint paths: `--model artifacts/<run>/sft` must work as typed
    return source if storage.is_remote(source) else os.path.abspath(source)


def _relocated(manifest_uri: str, stage_dir: str, path: str) -> str:
    """`path` (absolute, or relative to the manifest's uri) looked up first next to the manifest as
    found, so a copied or moved stage directory reads its own files, not the original's."""
    prefix = manifest_uri.rstrip("/") + "/"
    rel = path[len(prefix):] if path.startswith(prefix) else (path if "://" not in path and
                                                             not os.path.isabs(path) else None)
    if rel is None:
        return path
    here = storage.join(stage_dir, rel)
    return here if storage.exists(here) else storage.join(manifest_uri, rel)


def load_tokenizer(manifest: dict[str, Any], stage_dir: str) -> Tokenizer:
    candidates = [_relocated(manifest["uri"], stage_dir, "tokenizer")]
    if manifest.get("tokenizer_uri"):
        candidates.append(manifest["tokenizer_uri"])
    for directory in candidates:
        if not storage.exists(storage.join(directory, META_FILE)):
            continue
        return Tokenizer.load(storage.fetch_dir(directory))  # remote: downloaded to a temp dir
    raise LoadError(f"no tokenizer ({META_FILE}) in any of {candidates}; rerun the stage that wrote "
                    f"{manifest['uri']} (it copies the tokenizer next to its checkpoints)")


def abstract_model(config: PipelineConfig) -> GPT:
    """A GPT whose parameters are ShapeDtypeStructs (no memory, no init compute)."""
    return nnx.eval_shape(lambda: GPT(config.model, rngs=nnx.Rngs(0)))


def restore_model(config: PipelineConfig, state_dir: str, device: jax.Device | None = None) -> GPT:
    """Read only the 'model' subtree of a training checkpoint's `state` item onto one device."""
    from flaxchat.checkpoint import CheckpointError, restore_model_subtree

    shell = abstract_model(config)
    graphdef, state = nnx.split(shell)
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    pure = nnx.to_pure_dict(state)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), pure)
    try:
        restored = restore_model_subtree(state_dir, target)
    except CheckpointError as exc:
        raise LoadError(str(exc)) from exc
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def load_chat_model(source: str, *, verify: bool = True, device: jax.Device | None = None) -> LoadedModel:
    """Model + tokenizer from a stage output uri (or its manifest.json), local or gs://.
    `verify` checks every file's sha256 against the manifest first (local stage dirs only)."""
    stage_dir = _stage_dir(source)
    manifest = read_manifest(source if str(source).endswith(".json") else storage.join(stage_dir, MANIFEST_NAME))
    checkpoint = manifest.get("checkpoint") or {}
    if checkpoint.get("step") is None or not checkpoint.get("dir"):
        raise LoadError(f"the {manifest.get('stage')!r} manifest at {source} names no checkpoint "
                        f"(checkpoint.dir/step); point --model at a stage that trains a model")
    config = PipelineConfig.from_dict(manifest["config"])
    if verify and not storage.is_remote(stage_dir):
        verify_files(manifest, stage_dir)
    tokenizer = load_tokenizer(manifest, stage_dir)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise LoadError(f"tokenizer has {tokenizer.vocab_size} tokens but the model was trained with "
                        f"vocab_size={config.model.vocab_size}; the stage directory {stage_dir} is inconsistent")
    step = int(checkpoint["step"])
    state_dir = _relocated(manifest["uri"], stage_dir, storage.join(checkpoint["dir"], str(step), "state"))
    if not storage.exists(state_dir):
        raise LoadError(f"checkpoint step {step} not found at {state_dir}; "
                        f"rerun or resume the {manifest.get('stage')} stage")
    model = restore_model(config, state_dir, device)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, manifest=manifest, step=step)
