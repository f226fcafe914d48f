"""Pretrain stage: train the GPT from scratch on the tokenizer stage's data with Muon+AdamW.

Inputs: the `tokenizer` manifest (tokenizer files + the resolved data shards). Outputs under
`output_uri`: `checkpoints/<step>/` (orbax, checksummed; the last one is the model), the
tokenizer files copied alongside so the model directory is self-contained, `metrics.jsonl`,
and the manifest (val bpb before/after, tok/s, MFU, samples).

Resuming: a rerun finds its own checkpoints under `output_uri`; after a Metaflow `resume` the
flow passes the origin run's checkpoint directory as `resume_from` and training continues from
its newest good step (writing new checkpoints under this run's `output_uri`).

    python -m steps.pretrain --preset demo --input tokenizer=/path/to/tokenizer/output --out /tmp/pt
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from flaxchat import storage
from flaxchat.checkpoint import CheckpointStore, tree_digest
from flaxchat.config import PipelineConfig
from flaxchat.data.loader import PackedLoader, Prefetcher
from flaxchat.distributed import initialize_distributed
from flaxchat.flops import estimate_flops
from flaxchat.manifest import build_manifest, require, write_manifest
from flaxchat.mesh import create_sharded, create_sharded_optimizer, make_mesh, mesh_context
from flaxchat.model import GPT
from flaxchat.optim import build_optimizer, lr_multiplier, plan_training
from flaxchat.optim.schedules import ScheduleConfig
from flaxchat.tokenizer import Tokenizer
from flaxchat.train.evaluate import make_bpb_evaluator
from flaxchat.train.loop import LoopConfig, train
from flaxchat.train.samples import make_sampler
from flaxchat.train.sinks import Sink, console_sink, jsonl_sink, wandb_sink

STAGE = "pretrain"
SAMPLE_PROMPTS = ["Once upon a time", "Tom had 3 apples and", "The capital of France is"]


class DictBatches:
    """(inputs, targets) loader -> {"inputs", "targets"} micro-batches, keeping its resumable state."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for inputs, targets in self.loader:
            yield {"inputs": inputs, "targets": targets}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def close(self) -> None:
        getattr(self.loader, "close", lambda: None)()


def load_tokenizer(manifest: dict[str, Any]) -> Tokenizer:
    return Tokenizer.load(storage.fetch_dir(manifest["uri"]))


def pretrain_loss(model: GPT, batch: dict[str, jax.Array]) -> jax.Array:
    return model(batch["inputs"], batch["targets"])


def run(config: PipelineConfig, inputs: dict[str, dict[str, Any]], output_uri: str, *,
        resume_from: str | None = None, extra_sinks: tuple[Callable, ...] = ()) -> dict[str, Any]:
    initialize_distributed()
    tok_manifest = require(inputs, "tokenizer")
    tokenizer = load_tokenizer(tok_manifest)
    shards = tok_manifest["data"]["shards"]
    mcfg, tcfg = config.model, config.pretrain
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={mcfg.vocab_size}; "
                         f"rerun the tokenizer stage with this config")

    mesh = make_mesh(config.mesh)
    plan = plan_training(tcfg, mcfg, jax.device_count())
    rows = tcfg.device_batch_size * jax.device_count()           # global rows per micro-step
    with mesh_context(mesh, config.mesh.rules):
        model = create_sharded(lambda: GPT(mcfg, rngs=nnx.Rngs(config.seed)), mesh, config.mesh.rules)
        lr_scale = plan.batch_lr_scale if tcfg.batch_lr_scaling else 1.0
        tx = build_optimizer(tcfg, mcfg, plan.num_steps, lr_scale, plan.weight_decay)
        optimizer = create_sharded_optimizer(model, tx, mesh, config.mesh.rules)

    def make_loader(split: str, state=None):
        return PackedLoader(shards, tokenizer.encode, tokenizer.bos_token_id, rows, mcfg.sequence_len,
                            split=split, seed=config.seed, process_index=jax.process_index(),
                            process_count=jax.process_count(), state=state)

    schedule = ScheduleConfig.from_train(tcfg, plan.num_steps)
    loop_cfg = LoopConfig(
        num_steps=plan.num_steps, accum_steps=plan.grad_accum_steps, log_every=tcfg.log_every,
        eval_every=tcfg.eval_every, sample_every=tcfg.sample_every, checkpoint_every=tcfg.checkpoint_every,
        tokens_per_step=plan.total_batch_size, flops_per_token=float(estimate_flops(mcfg)),
        lr_at=lambda step: float(lr_multiplier(step, schedule)))
    eval_batches = max(1, tcfg.eval_tokens // (rows * mcfg.sequence_len))
    evaluate = make_bpb_evaluator(model, mesh, tokenizer.token_bytes(),
                                  lambda: DictBatches(make_loader("val")), eval_batches)

    # small side files (metrics, wandb, the tokenizer copy) are written locally first; on GCS they are
    # uploaded at the end (checkpoints go to `output_uri` directly through orbax)
    local_out = output_uri if not storage.is_gcs(output_uri) else tempfile.mkdtemp(prefix="flaxchat-pt-")
    os.makedirs(local_out, exist_ok=True)
    sinks: list[Sink] = [console_sink(plan.num_steps), jsonl_sink(os.path.join(local_out, "metrics.jsonl"))]
    if jax.process_index() == 0:
        sinks.append(wandb_sink("flaxchat", f"pretrain-d{mcfg.depth}", config.to_dict(), local_out))
    sinks += list(extra_sinks)

    store = CheckpointStore(storage.join(output_uri, "checkpoints"), keep=tcfg.keep_checkpoints)
    resume_stores = (CheckpointStore(resume_from, keep=tcfg.keep_checkpoints),) if resume_from else ()
    with mesh_context(mesh, config.mesh.rules):
        result = train(model=model, optimizer=optimizer, loss_fn=pretrain_loss, mesh=mesh,
                       make_batches=lambda state: DictBatches(Prefetcher(make_loader("train", state))),
                       cfg=loop_cfg, store=store, resume_stores=resume_stores, evaluate=evaluate,
                       sample=make_sampler(tokenizer, SAMPLE_PROMPTS), sinks=tuple(sinks))
    for sink in sinks:
        getattr(sink, "finish", lambda: None)()

    tok_files = tokenizer.save(os.path.join(local_out, "tokenizer"))
    if storage.is_gcs(output_uri):
        for dirpath, _, names in os.walk(local_out):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), local_out)
                with open(os.path.join(local_out, rel), "rb") as fh:
                    storage.write_bytes(storage.join(output_uri, rel), fh.read())
    final = result.checkpoint_step
    ckpt_dir = storage.join("checkpoints", str(final))
    files = {f"{ckpt_dir}/{rel}": digest for rel, digest in _checkpoint_files(store, final).items()}
    files.update({f"tokenizer/{k}": v for k, v in tok_files.items()})
    first_eval = result.evals[0] if result.evals else {}
    last_eval = result.evals[-1] if result.evals else {}
    tail = result.history[-5:]
    metrics = {
        "steps": result.step, "resumed_from_step": result.resumed_from,
        "val_bpb_initial": first_eval.get("val_bpb") if first_eval.get("step") == 0 else None,
        "val_bpb": last_eval.get("val_bpb"),
        "final_loss": tail[-1]["loss"] if tail else None,
        "tok_per_s": float(np.median([r["tok_per_s"] for r in tail])) if tail else None,
        "mfu": float(np.median([r.get("mfu", np.nan) for r in tail])) if tail else None,
        "total_batch_tokens": plan.total_batch_size, "grad_accum_steps": plan.grad_accum_steps,
        "num_scaling_params": plan.num_scaling_params,
        "params_sha256": tree_digest(model.param_tree()),
    }
    manifest = build_manifest(
        STAGE, output_uri, metrics, config.to_dict(), files,
        checkpoint={"dir": storage.join(output_uri, "checkpoints"), "step": final},
        tokenizer_uri=tok_manifest["uri"], data={"shards": shards},
        history=result.history, evals=result.evals, samples=result.samples[-1:] if result.samples else [])
    write_manifest(manifest)
    return manifest


def _checkpoint_files(store: CheckpointStore, step: int | None) -> dict[str, str]:
    import json
    from flaxchat.checkpoint import CHECKSUMS
    if step is None:
        return {}
    path = storage.join(store.directory, str(step), CHECKSUMS)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


if __name__ == "__main__":
    from steps.common import main
    sys.exit(main(STAGE, run))
