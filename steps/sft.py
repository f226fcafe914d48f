"""SFT stage: supervised fine-tuning of the pretrained model on a chat task mixture.

nanochat's chat_sft recipe (the knobs are `config.sft`, see `flaxchat.config.sft_defaults`):
the mixture (SmolTalk + MMLU auxiliary x3 + GSM8K x4 (+ a user JSONL), or the demo's generated
chats and word problems) shuffled with a fixed seed, best-fit packed with padding (pad = BOS,
target -1), loss only on assistant text, python calls and <|assistant_end|>; one epoch by
default. Reports held-out loss (mean NLL per supervised token, and bits per byte) before and
after, and greedy accuracy on held-out problems (with the calculator tool) at its eval interval.

Inputs: the `pretrain` manifest (model shape from its config, weights from its checkpoint,
tokenizer beside it). Outputs under `output_uri`: checkpoints, the tokenizer, the mixture as
parquet (`data/`), `metrics.jsonl`, the manifest.

    python -m steps.sft --preset demo --input pretrain=/path/to/pretrain/output --out /tmp/sft
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Callable, Sequence

import jax

from flaxchat.config import PipelineConfig
from flaxchat.data.conversations import conversation_encoder, count_tokens, write_conversation_shards
from flaxchat.data.loader import PackedLoader, Prefetcher
from flaxchat.inference.engine import Engine
from flaxchat.tasks.mixtures import rl_eval_task, sft_train_mixture, sft_val_mixture
from flaxchat.train.evaluate import make_bpb_evaluator
from flaxchat.train.generative import make_generative_evaluator
from steps.pretrain import DictBatches, pretrain_loss
from steps.training import TrainingStage, first_and_last, require_model_input

STAGE = "sft"
GEN_PROBLEMS = 32          # held-out problems in the greedy generative check
GEN_MAX_TOKENS = 128


def plan_steps(num_steps: int, epoch_tokens: int, tokens_per_step: int) -> int:
    """-1: the steps one epoch of rendered tokens fills (padding means a few percent of the epoch
    carry over, as with nanochat's row-count based estimate)."""
    if num_steps > 0:
        return num_steps
    return max(1, math.ceil(epoch_tokens / tokens_per_step))


def run(config: PipelineConfig, inputs: dict[str, dict[str, Any]], output_uri: str, *,
        resume_from: str | Sequence[str] | None = None, extra_sinks: tuple[Callable, ...] = ()) -> dict[str, Any]:
    stage = TrainingStage(STAGE, config, config.sft, output_uri, resume_from=resume_from, extra_sinks=extra_sinks)
    tokenizer = stage.open_upstream(require_model_input(inputs, "pretrain"))
    config, tcfg = stage.config, config.sft
    T = config.model.sequence_len
    rows = tcfg.device_batch_size * jax.device_count()
    tokens_per_micro = rows * T
    total = tcfg.total_batch_size if tcfg.total_batch_size > 0 else tokens_per_micro
    if total % tokens_per_micro:
        raise ValueError(f"sft.total_batch_size={total} must be a multiple of device_batch_size x devices x "
                         f"sequence_len = {tokens_per_micro}; change one of them")
    accum = total // tokens_per_micro

    train_mix, val_mix = sft_train_mixture(config), sft_val_mixture(config)
    shards = write_conversation_shards(train_mix, val_mix, os.path.join(stage.local_out, "data"))
    encode = conversation_encoder(tokenizer)
    epoch_tokens = count_tokens(train_mix, tokenizer, T + 1)
    model, _ = stage.build(plan_steps(tcfg.num_steps, epoch_tokens, total))

    def make_loader(split: str, state=None):
        return PackedLoader(shards, encode, tokenizer.bos_token_id, rows, T, split=split, mode="sft",
                            seed=config.seed, process_index=jax.process_index(),
                            process_count=jax.process_count(), state=state)

    eval_batches = max(1, tcfg.eval_tokens // tokens_per_micro)
    val_loss = make_bpb_evaluator(model, stage.mesh, tokenizer.token_bytes(),
                                  lambda: DictBatches(make_loader("val")), eval_batches)
    engine = Engine(model, tokenizer, max_len=T)
    generative = make_generative_evaluator(
        engine, rl_eval_task(config), num_problems=GEN_PROBLEMS, num_samples=1, max_tokens=GEN_MAX_TOKENS,
        temperature=0.0, top_k=0, seed=config.seed, prefix="greedy_")

    def evaluate(m) -> dict[str, Any]:
        return {**val_loss(m), **generative(m)}

    result = stage.train(loss_fn=pretrain_loss,
                         make_batches=lambda state: DictBatches(Prefetcher(make_loader("train", state))),
                         loop_cfg=stage.loop_config(accum, total), evaluate=evaluate)
    loss_before, loss_after = first_and_last(result.evals, "val_loss")
    bpb_before, bpb_after = first_and_last(result.evals, "val_bpb")
    acc_before, acc_after = first_and_last(result.evals, "greedy_pass@1")
    metrics = {
        "val_loss_initial": loss_before, "val_loss": loss_after,
        "val_bpb_initial": bpb_before, "val_bpb": bpb_after,
        "greedy_accuracy_initial": acc_before, "greedy_accuracy": acc_after,
        "train_conversations": len(train_mix), "val_conversations": len(val_mix),
        "epoch_tokens": epoch_tokens, "total_batch_tokens": total, "grad_accum_steps": accum,
    }
    return stage.finish(result, metrics, data={"shards": shards})


if __name__ == "__main__":
    from steps.common import main
    sys.exit(main(STAGE, run))
