"""Pretrain stage: train the GPT from scratch on the tokenizer stage's data with Muon+AdamW.

Inputs: the `tokenizer` manifest (tokenizer files + the resolved data shards). Outputs under
`output_uri`: `checkpoints/<step>/` (orbax, checksummed; the last one is the model), the
tokenizer files copied alongside so the model directory is self-contained, `metrics.jsonl`,
and the manifest (val bpb before/after, tok/s, MFU, samples).

Resuming: a rerun finds its own checkpoints under `output_uri`; after a Metaflow `resume` the
flow passes this stage's checkpoint directories in the origin run, its origin, … as `resume_from`
(nearest first) and training continues from the newest good step found (writing new checkpoints
under this run's `output_uri`; a final step is adopted there as it is, see `steps/training.py`).

    python -m steps.pretrain --preset demo --input tokenizer=/path/to/tokenizer/output --out /tmp/pt
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from flaxchat.config import PipelineConfig
from flaxchat.data.loader import PackedLoader, Prefetcher
from flaxchat.manifest import require
from flaxchat.model.gpt import GPT
from flaxchat.optim import plan_training
from flaxchat.tokenizer import Tokenizer
from flaxchat import storage
from flaxchat.train.evaluate import make_bpb_evaluator
from flaxchat.train.samples import make_sampler
from steps.training import TrainingStage, first_and_last

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


def pretrain_loss(model: GPT, batch: dict[str, jax.Array]) -> jax.Array:
    return model(batch["inputs"], batch["targets"])


def run(config: PipelineConfig, inputs: dict[str, dict[str, Any]], output_uri: str, *,
        resume_from: str | Sequence[str] | None = None, extra_sinks: tuple[Callable, ...] = ()) -> dict[str, Any]:
    tok_manifest = require(inputs, "tokenizer")
    stage = TrainingStage(STAGE, config, config.pretrain, output_uri, resume_from=resume_from,
                          extra_sinks=extra_sinks)
    tokenizer = stage.use_tokenizer(Tokenizer.load(storage.fetch_dir(tok_manifest["uri"])))
    shards = tok_manifest["data"]["shards"]
    mcfg, tcfg = config.model, config.pretrain
    plan = plan_training(tcfg, mcfg, jax.device_count())
    rows = tcfg.device_batch_size * jax.device_count()           # global rows per micro-step
    model, _ = stage.build(plan.num_steps, lr_scale=plan.batch_lr_scale if tcfg.batch_lr_scaling else 1.0,
                           weight_decay=plan.weight_decay)

    def make_loader(split: str, state=None):
        return PackedLoader(shards, tokenizer.encode, tokenizer.bos_token_id, rows, mcfg.sequence_len,
                            split=split, seed=config.seed, process_index=jax.process_index(),
                            process_count=jax.process_count(), state=state)

    eval_batches = max(1, tcfg.eval_tokens // (rows * mcfg.sequence_len))
    evaluate = make_bpb_evaluator(model, stage.mesh, tokenizer.token_bytes(),
                                  lambda: DictBatches(make_loader("val")), eval_batches)
    result = stage.train(loss_fn=pretrain_loss,
                         make_batches=lambda state: DictBatches(Prefetcher(make_loader("train", state))),
                         loop_cfg=stage.loop_config(plan.grad_accum_steps, plan.total_batch_size),
                         evaluate=evaluate, sample=make_sampler(tokenizer, SAMPLE_PROMPTS))
    tail = result.history[-5:]
    bpb_initial, bpb = first_and_last(result.evals, "val_bpb")
    metrics = {
        "val_bpb_initial": bpb_initial, "val_bpb": bpb,
        "mfu": float(np.median([r.get("mfu", np.nan) for r in tail])) if tail else None,
        "total_batch_tokens": plan.total_batch_size, "grad_accum_steps": plan.grad_accum_steps,
        "num_scaling_params": plan.num_scaling_params,
    }
    return stage.finish(result, metrics, tokenizer_uri=tok_manifest["uri"], data={"shards": shards})


if __name__ == "__main__":
    from steps.common import main
    sys.exit(main(STAGE, run))
