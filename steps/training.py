"""What the three training stages (pretrain, sft, grpo) share: one way of running a stage.

A training stage differs from the others only in where its model starts (a fresh init, or an
upstream stage's checkpoint), its batches, its loss and its evaluations. Everything else lives
here, once: distributed init, the mesh, the sharded model and optimizer built from the stage's
`TrainConfig` section, the sinks (console, JSONL, wandb, the flow's live card), the checkpoint
store and resume (own checkpoints first, then the origin run's after a Metaflow `resume`), the
side files (tokenizer copy, metrics) uploaded next to the checkpoints, and the manifest.

    stage = TrainingStage("sft", config, config.sft, output_uri, resume_from, extra_sinks)
    tokenizer = stage.open_upstream(inputs["pretrain"])      # model shape + weights from its manifest
    model, optimizer = stage.build(num_steps, init=stage.upstream_params)
    result = stage.train(loss_fn=..., make_batches=..., loop_cfg=stage.loop_config(...), ...)
    return stage.finish(result, metrics, ...)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from flaxchat import storage
from flaxchat.checkpoint import CHECKSUMS, CheckpointError, CheckpointStore, restore_model_subtree, tree_digest
from flaxchat.config import PipelineConfig, TrainConfig
from flaxchat.distributed import initialize_distributed
from flaxchat.flops import estimate_flops
from flaxchat.manifest import ManifestError, build_manifest, write_manifest
from flaxchat.mesh import create_sharded, create_sharded_optimizer, make_mesh, mesh_context
from flaxchat.model import GPT
from flaxchat.optim import build_optimizer, lr_multiplier
from flaxchat.optim.schedules import ScheduleConfig
from flaxchat.tokenizer import Tokenizer
from flaxchat.train.loop import LoopConfig, LoopResult, train
from flaxchat.train.sinks import Sink, console_sink, jsonl_sink, wandb_sink


class StageInputError(ValueError):
    """An upstream manifest this stage cannot use; the message names it and the fix."""


def upstream_state_dir(manifest: dict[str, Any]) -> str:
    """The orbax `state` directory of the checkpoint an upstream manifest names."""
    ckpt = manifest.get("checkpoint") or {}
    if ckpt.get("step") is None or not ckpt.get("dir"):
        raise StageInputError(f"the {manifest.get('stage')!r} manifest at {manifest.get('uri')} names no "
                              f"checkpoint; pass the output of a stage that trains a model")
    path = storage.join(ckpt["dir"], str(ckpt["step"]), "state")
    if not storage.exists(path):
        raise StageInputError(f"checkpoint {path} named by the {manifest.get('stage')} manifest is missing; "
                              f"rerun or resume that stage")
    return path


def restore_params(model: GPT, state_dir: str) -> None:
    """Overwrite `model`'s params (already sharded) with the `model` subtree of a training
    checkpoint, read straight into the same shardings."""
    state = nnx.state(model)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.to_pure_dict(state))
    try:
        restored = restore_model_subtree(state_dir, target)
    except CheckpointError as exc:
        raise StageInputError(str(exc)) from exc
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)


def load_stage_tokenizer(manifest: dict[str, Any]) -> Tokenizer:
    """The tokenizer a stage output carries (`<uri>/tokenizer`), else its `tokenizer_uri`."""
    for uri in (storage.join(manifest["uri"], "tokenizer"), manifest.get("tokenizer_uri"), manifest["uri"]):
        if uri and storage.exists(storage.join(uri, "tokenizer.json")):
            return Tokenizer.load(storage.fetch_dir(uri))
    raise StageInputError(f"no tokenizer next to the {manifest.get('stage')} output {manifest['uri']}; "
                          f"rerun that stage (training stages copy the tokenizer beside their checkpoints)")


class TrainingStage:
    """One training stage's wiring; see the module docstring."""

    def __init__(self, name: str, config: PipelineConfig, train_cfg: TrainConfig, output_uri: str, *,
                 resume_from: str | None = None, extra_sinks: tuple[Callable, ...] = ()):
        initialize_distributed()
        self.started = time.time()
        self.name, self.config, self.train_cfg, self.output_uri = name, config, train_cfg, output_uri
        self.resume_from, self.extra_sinks = resume_from, tuple(extra_sinks)
        self.mesh = make_mesh(config.mesh)
        self.upstream: dict[str, Any] | None = None
        self.tokenizer: Tokenizer | None = None
        self.model: GPT | None = None
        self.optimizer = None
        self.num_steps = 0
        # small side files are written locally first; on GCS they are uploaded at the end
        # (checkpoints go to `output_uri` directly through orbax)
        # (nothing is created before the inputs are validated: a bad input leaves no directory behind)
        self.local_out = output_uri if not storage.is_gcs(output_uri) else tempfile.mkdtemp(prefix=f"flaxchat-{name}-")

    # ------------------------------------------------------------------ model
    def use_tokenizer(self, tokenizer: Tokenizer) -> Tokenizer:
        if tokenizer.vocab_size != self.config.model.vocab_size:
            raise StageInputError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                                  f"{self.config.model.vocab_size}; rerun the tokenizer stage with this config")
        self.tokenizer = tokenizer
        return tokenizer

    def open_upstream(self, manifest: dict[str, Any]) -> Tokenizer:
        """Continue from an upstream model: its shape comes from its manifest's config (never from a
        tag or this run's flags), and its tokenizer must match the checkpoint's vocabulary."""
        upstream_cfg = PipelineConfig.from_dict(manifest["config"])
        tokenizer = load_stage_tokenizer(manifest)
        if tokenizer.vocab_size != upstream_cfg.model.vocab_size:
            raise StageInputError(
                f"the {manifest.get('stage')} checkpoint has vocabulary {upstream_cfg.model.vocab_size} but its "
                f"tokenizer has {tokenizer.vocab_size} tokens; the stage output {manifest['uri']} is inconsistent, "
                f"rerun that stage")
        self.config = dataclasses.replace(self.config, model=upstream_cfg.model, tokenizer=upstream_cfg.tokenizer)
        self.upstream = manifest
        self.tokenizer = tokenizer
        return tokenizer

    def build(self, num_steps: int, *, lr_scale: float = 1.0, weight_decay: float | None = None):
        """The sharded model (fresh init, or the upstream checkpoint's weights) and its optimizer."""
        mcfg, rules = self.config.model, self.config.mesh.rules
        self.num_steps = num_steps
        with mesh_context(self.mesh, rules):
            model = create_sharded(lambda: GPT(mcfg, rngs=nnx.Rngs(self.config.seed)), self.mesh, rules)
            if self.upstream is not None:
                restore_params(model, upstream_state_dir(self.upstream))
            tx = build_optimizer(self.train_cfg, mcfg, num_steps, lr_scale, weight_decay)
            optimizer = create_sharded_optimizer(model, tx, self.mesh, rules)
        self.model, self.optimizer = model, optimizer
        return model, optimizer

    def loop_config(self, accum_steps: int, tokens_per_step: int) -> LoopConfig:
        t = self.train_cfg
        schedule = ScheduleConfig.from_train(t, self.num_steps)
        return LoopConfig(num_steps=self.num_steps, accum_steps=accum_steps, log_every=t.log_every,
                          eval_every=t.eval_every, sample_every=t.sample_every,
                          checkpoint_every=t.checkpoint_every, tokens_per_step=tokens_per_step,
                          flops_per_token=float(estimate_flops(self.config.model)),
                          lr_at=lambda step: float(lr_multiplier(step, schedule)))

    # ------------------------------------------------------------------ running
    def sinks(self) -> list[Sink]:
        os.makedirs(self.local_out, exist_ok=True)
        sinks: list[Sink] = [console_sink(self.num_steps), jsonl_sink(os.path.join(self.local_out, "metrics.jsonl"))]
        if jax.process_index() == 0:
            sinks.append(wandb_sink("flaxchat", f"{self.name}-d{self.config.model.depth}", self.config.to_dict(),
                                    self.local_out))
        return sinks + list(self.extra_sinks)

    def train(self, *, loss_fn, make_batches, loop_cfg: LoopConfig, evaluate=None, sample=None,
              sinks: list[Sink] | None = None) -> LoopResult:
        """Run the one training loop with this stage's checkpoint store and resume sources."""
        sinks = self.sinks() if sinks is None else sinks
        keep = self.train_cfg.keep_checkpoints
        self.store = CheckpointStore(storage.join(self.output_uri, "checkpoints"), keep=keep)
        resume = (CheckpointStore(self.resume_from, keep=keep),) if self.resume_from else ()
        try:
            with mesh_context(self.mesh, self.config.mesh.rules):
                return train(model=self.model, optimizer=self.optimizer, loss_fn=loss_fn, mesh=self.mesh,
                             make_batches=make_batches, cfg=loop_cfg, store=self.store, resume_stores=resume,
                             evaluate=evaluate, sample=sample, sinks=tuple(sinks))
        finally:
            for sink in sinks:
                getattr(sink, "finish", lambda: None)()

    # ------------------------------------------------------------------ outputs
    def finish(self, result: LoopResult, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Copy the tokenizer beside the checkpoints, upload side files, write the manifest (last)."""
        assert self.tokenizer is not None and self.model is not None
        tok_files = self.tokenizer.save(os.path.join(self.local_out, "tokenizer"))
        if storage.is_gcs(self.output_uri):
            for dirpath, _, names in os.walk(self.local_out):
                for name in names:
                    rel = os.path.relpath(os.path.join(dirpath, name), self.local_out)
                    with open(os.path.join(self.local_out, rel), "rb") as fh:
                        storage.write_bytes(storage.join(self.output_uri, rel), fh.read())
        final = result.checkpoint_step
        files = {f"checkpoints/{final}/{rel}": digest for rel, digest in self._checkpoint_files(final).items()}
        files.update({f"tokenizer/{k}": v for k, v in tok_files.items()})
        tail = result.history[-5:]
        metrics = {
            "steps": result.step, "resumed_from_step": result.resumed_from,
            "final_loss": tail[-1]["loss"] if tail else None,
            "tok_per_s": float(np.median([r["tok_per_s"] for r in tail])) if tail else None,
            **metrics,
            "params_sha256": tree_digest(self.model.param_tree()),
            "wall_seconds": time.time() - self.started,
        }
        if self.upstream is not None:
            extra.setdefault("parent", {"stage": self.upstream.get("stage"), "uri": self.upstream["uri"]})
        manifest = build_manifest(
            self.name, self.output_uri, metrics, self.config.to_dict(), files,
            checkpoint={"dir": storage.join(self.output_uri, "checkpoints"), "step": final},
            history=result.history, evals=result.evals,
            samples=result.samples[-1:] if result.samples else [], **extra)
        write_manifest(manifest)
        return manifest

    def _checkpoint_files(self, step: int | None) -> dict[str, str]:
        if step is None:
            return {}
        path = storage.join(self.store.directory, str(step), CHECKSUMS)
        return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def first_and_last(evals: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    """(the step-0 value of an eval metric, or None after a resume; the last value)."""
    first = evals[0].get(key) if evals and evals[0].get("step") == 0 else None
    last = evals[-1].get(key) if evals else None
    return first, last


def require_model_input(inputs: dict[str, dict[str, Any]], *stages: str) -> dict[str, Any]:
    """The first of `stages` present in `inputs` (e.g. grpo continues from sft, else pretrain)."""
    for stage in stages:
        if inputs.get(stage):
            return inputs[stage]
    raise ManifestError(f"missing input manifest: pass one of {', '.join(stages)} "
                        f"(flow artifact or --input {stages[0]}=URI)")
