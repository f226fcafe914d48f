"""What the three training stages (pretrain, sft, grpo) share: one way of running a stage.

A training stage differs from the others only in where its model starts (a fresh init, or an
upstream stage's checkpoint), its batches, its loss and its evaluations. Everything else lives
here, once: distributed init, the mesh, the sharded model and optimizer built from the stage's
`TrainConfig` section, the sinks (console, JSONL, wandb, the flow's live card), the checkpoint
store and resume (own checkpoints first, then each origin run's along a chain of Metaflow
`resume`s, nearest first), the stage's record carried in every checkpoint (so a resumed stage
reports its whole run), the side files (tokenizer copy, metrics) uploaded next to the
checkpoints, and the manifest. In a multi-process job (the flow's @parallel steps) every process
runs all of this and writes its own shards of each checkpoint; process 0 alone writes the side
files, metrics.jsonl, wandb and the manifest (`writes_outputs`).

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
import shutil
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from flaxchat import storage
from flaxchat.checkpoint import CHECKSUMS, CheckpointError, CheckpointStore, restore_model_subtree, tree_digest
from flaxchat.config import PipelineConfig, TrainConfig
from flaxchat.distributed import initialize_distributed
from flaxchat.model.flops import estimate_flops
from flaxchat.manifest import ManifestError, build_manifest, write_manifest
from flaxchat.mesh import create_sharded, create_sharded_optimizer, make_mesh, mesh_context
from flaxchat.model.gpt import GPT
from flaxchat.optim import build_optimizer, lr_multiplier
from flaxchat.optim.schedules import ScheduleConfig
from flaxchat.tokenizer import Tokenizer
from flaxchat.train.loop import LoopConfig, LoopResult, train
from flaxchat.train.sinks import Sink, console_sink, jsonl_sink, wandb_sink


def writes_outputs() -> bool:
    """Whether this process writes a stage's side files, metrics and manifest: process 0 alone
    (every process writes its own shards of each checkpoint, through orbax)."""
    return jax.process_index() == 0


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


RECORD_KEY = "stage_record"


def _json_safe(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


class StageRecord:
    """What a stage has reported so far (its train log, evals, samples, GRPO rounds), carried in
    the `meta` of every checkpoint it saves. A resumed stage therefore reports its whole run, not
    just the part after the resume; one resumed at its final step (it failed after its last
    checkpoint: in the card, an upload, before the manifest) trains nothing and still has its
    final numbers, exactly as computed, without evaluating again. A sink: give it every event."""

    KINDS = {"train": "history", "eval": "evals", "sample": "samples", "rollout": "rollouts"}
    ROLLOUT_EXAMPLES = 3   # GRPO rounds that keep their example rollouts (as the manifest does)

    def __init__(self) -> None:
        self.carried: dict[str, list[dict[str, Any]]] = {k: [] for k in self.KINDS.values()}
        self.new: dict[str, list[dict[str, Any]]] = {k: [] for k in self.KINDS.values()}
        self.restored = False   # a checkpoint with a record was restored

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        if kind in self.KINDS:
            self.new[self.KINDS[kind]].append(record)

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Everything so far, as plain JSON (the copy saved with a checkpoint)."""
        out = {k: self.carried[k] + self.new[k] for k in self.carried}
        keep = self.ROLLOUT_EXAMPLES
        out["rollouts"] = ([{k: v for k, v in r.items() if k != "examples"} for r in out["rollouts"][:-keep]]
                           + out["rollouts"][-keep:])
        return json.loads(json.dumps(out, default=_json_safe))

    def resume(self, saved: dict[str, Any] | None) -> None:
        """Continue from a restored checkpoint's record (None: it has none, e.g. an older checkpoint)."""
        self.carried = {k: list((saved or {}).get(k, [])) for k in self.KINDS.values()}
        self.new = {k: [] for k in self.KINDS.values()}
        self.restored = saved is not None


class RecordingStore(CheckpointStore):
    """A CheckpointStore that saves the stage's record in each checkpoint's meta and picks it up
    from the checkpoint the training loop restores."""

    def __init__(self, directory: str, record: StageRecord, keep: int | None = 3):
        super().__init__(directory, keep=keep)
        self.record = record

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        super().save(step, state, {**meta, RECORD_KEY: self.record.snapshot()})

    def restore_latest(self, abstract_state: Any):
        found = super().restore_latest(abstract_state)
        if found:
            self.record.resume(found[2].get(RECORD_KEY))
        return found


def _copy_step(src: str, dst: str) -> None:
    """Copy a finished checkpoint step directory so that `dst` appears complete or not at all:
    locally hard links (no bytes copied; a copy across filesystems) into a sibling then a rename;
    in an object store a server-side copy of each object (GCS rewrite: no bytes through this
    machine), the checksum file and orbax's commit marker last."""
    if storage.is_remote(src) or storage.is_remote(dst):
        storage.remove_tree(dst)   # an uncommitted leftover of an earlier attempt
        storage.copy_dir(src, dst, last=(CHECKSUMS, "commit_success.txt"))
        return

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    tmp = f"{os.path.dirname(dst)}.adopting-{os.path.basename(dst)}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(tmp, dst)


class TrainingStage:
    """One training stage's wiring; see the module docstring."""

    def __init__(self, name: str, config: PipelineConfig, train_cfg: TrainConfig, output_uri: str, *,
                 resume_from: str | Sequence[str] | None = None, extra_sinks: tuple[Callable, ...] = ()):
        """`resume_from`: checkpoint directories to continue from when `output_uri` has none, nearest
        first (after a Metaflow `resume`: this stage's in the origin run, then in its origin, …)."""
        initialize_distributed()
        self.started = time.time()
        # orbax wants absolute paths, and the manifest is read from other directories and machines
        output_uri = output_uri if storage.is_gcs(output_uri) else os.path.abspath(output_uri)
        self.name, self.config, self.train_cfg, self.output_uri = name, config, train_cfg, output_uri
        sources = [resume_from] if isinstance(resume_from, str) else list(resume_from or ())
        self.resume_from = [s if storage.is_gcs(s) else os.path.abspath(s) for s in sources]
        self.extra_sinks = tuple(extra_sinks)
        self.record = StageRecord()
        self.mesh = make_mesh(config.mesh)
        self.upstream: dict[str, Any] | None = None
        self.tokenizer: Tokenizer | None = None
        self.model: GPT | None = None
        self.optimizer = None
        self.num_steps = 0
        # small side files (tokenizer copy, wandb's offline files) are written locally first; on GCS
        # they are uploaded at the end (checkpoints go to `output_uri` directly through orbax, and
        # metrics.jsonl is streamed there by its sink)
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
        """Every process logs to its console; process 0 alone writes metrics.jsonl and wandb (the
        events are global: every process sees the same losses and evals)."""
        sinks: list[Sink] = [console_sink(self.num_steps)]
        if writes_outputs():
            os.makedirs(self.local_out, exist_ok=True)
            # straight to the output (gs:// too), written while training: a crash keeps what was logged
            sinks.append(jsonl_sink(storage.join(self.output_uri, "metrics.jsonl")))
            sinks.append(wandb_sink("flaxchat", f"{self.name}-d{self.config.model.depth}", self.config.to_dict(),
                                    self.local_out))
        return sinks + list(self.extra_sinks) + [self.record]

    def train(self, *, loss_fn, make_batches, loop_cfg: LoopConfig, evaluate=None, sample=None,
              sinks: list[Sink] | None = None) -> LoopResult:
        """Run the one training loop with this stage's checkpoint store and resume sources. The
        result covers the whole run: what the restored checkpoint carried, then this attempt."""
        sinks = self.sinks() if sinks is None else list(sinks)
        if self.record not in sinks:
            sinks.append(self.record)
        keep = self.train_cfg.keep_checkpoints
        own_dir = storage.join(self.output_uri, "checkpoints")
        # orbax would create a missing directory: never write into an origin run that has none
        resume = tuple(RecordingStore(d, self.record, keep=keep) for d in self.resume_from if storage.exists(d))
        self._adopt_final_checkpoint(own_dir, resume)
        self.store = RecordingStore(own_dir, self.record, keep=keep)
        try:
            with mesh_context(self.mesh, self.config.mesh.rules):
                result = train(model=self.model, optimizer=self.optimizer, loss_fn=loss_fn, mesh=self.mesh,
                               make_batches=make_batches, cfg=loop_cfg, store=self.store, resume_stores=resume,
                               evaluate=evaluate, sample=sample, sinks=tuple(sinks))
                if not self.record.restored and result.resumed_from == result.step:
                    self._final_eval(result, evaluate, sample, sinks)
        finally:
            for sink in sinks:
                getattr(sink, "finish", lambda: None)()
        carried = self.record.carried
        return dataclasses.replace(result, history=carried["history"] + result.history,
                                   evals=carried["evals"] + result.evals, samples=carried["samples"] + result.samples)

    def carried_rollouts(self) -> list[dict[str, Any]]:
        """GRPO rounds reported before the restored checkpoint (the stage collects the rest)."""
        return list(self.record.carried["rollouts"])

    def _adopt_final_checkpoint(self, own_dir: str, sources: tuple[CheckpointStore, ...]) -> None:
        """When this output has no checkpoint and the nearest resume source that has any got as far
        as the FINAL step (the stage failed after training: in its card, an upload, before its
        manifest), copy that step into this output's checkpoints. The loop then resumes from it in
        place and trains zero steps, and the manifest names a checkpoint this output really holds:
        self-contained like an uninterrupted run's, whatever later happens to the origin run's files.
        (A source whose newest step is earlier is simply resumed from by the loop, which then
        saves the final step here itself.)"""
        probe = CheckpointStore(own_dir, keep=self.train_cfg.keep_checkpoints)
        has_own = bool(probe.steps())
        probe.close()
        if has_own:
            return
        for source in sources:
            steps = source.steps()
            if not steps:
                continue
            final = steps[-1]
            # process 0 checks and copies; a final step that fails its checksums is left to the
            # loop, which falls back to the previous one and trains the last steps again
            if final == self.num_steps and jax.process_index() == 0 and source.verify(final) is not False:
                _copy_step(storage.join(source.directory, str(final)), storage.join(own_dir, str(final)))
                print(f"{self.name}: the final checkpoint (step {final}) of {source.directory} is complete; "
                      f"adopted into {own_dir}, nothing left to train", flush=True)
            break
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"flaxchat-adopt:{own_dir}")

    def _final_eval(self, result: LoopResult, evaluate, sample, sinks: list[Sink]) -> None:
        """Resumed at the final step from a checkpoint without a record (saved before records
        existed): evaluate the restored model once, so the manifest still has its final numbers."""
        if evaluate is not None and not any(e.get("step") == result.step for e in result.evals):
            record = {"step": result.step, **evaluate(self.model)}
            result.evals.append(record)
            for sink in sinks:
                sink("eval", record)
        if sample is not None and not result.samples:
            record = {"step": result.step, "samples": sample(self.model, result.step)}
            result.samples.append(record)
            for sink in sinks:
                sink("sample", record)

    # ------------------------------------------------------------------ outputs
    def finish(self, result: LoopResult, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Copy the tokenizer beside the checkpoints, upload side files, write the manifest (last).
        Every process builds the same manifest (the digest below is a collective); process 0 alone
        writes files, the others hash the tokenizer in a scratch directory."""
        assert self.tokenizer is not None and self.model is not None
        writer = writes_outputs()
        if writer:
            tok_files = self.tokenizer.save(os.path.join(self.local_out, "tokenizer"))
        else:
            with tempfile.TemporaryDirectory(prefix=f"flaxchat-{self.name}-tok-") as scratch:
                tok_files = self.tokenizer.save(scratch)
        if writer and storage.is_gcs(self.output_uri):
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
        if writer:
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
