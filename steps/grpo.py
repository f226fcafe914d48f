"""GRPO stage: reinforcement learning with tool-use rollouts on problems with checkable answers.

Each optimizer step trains on P prompts x G samples drawn by the batched engine with the calculator
tool (`flaxchat/rl/rollouts.py`), rewarded by exact answer match (GSM8K, or the demo's word
problems), with group-relative advantages and a PPO-style clipped objective (`flaxchat/rl/`).
nanochat's chat_rl is this with `rl.advantage=drgrpo`, `rl.updates_per_batch=1`, `rl.kl_beta=0`
(REINFORCE with a mean baseline); our default is real GRPO (std-normalised advantages, a clip
range that only matters once a batch is reused). Held-out pass@1..pass@k at the eval interval
(temperature/top-k as sampled, as nanochat evaluates), before and after in the manifest.

Inputs: the `sft` manifest (else `pretrain`). Outputs: checkpoints (params, optimizer state, the
round cursor), the tokenizer, `metrics.jsonl`, the manifest. Resume is bitwise like pretraining.

    python -m steps.grpo --preset demo --input sft=/path/to/sft/output --out /tmp/grpo
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.chat_format import render_for_completion
from flaxchat.config import ConfigError, PipelineConfig
from flaxchat.inference.engine import Engine
from flaxchat.rl.objective import grpo_loss_fn, sequence_logprobs
from flaxchat.rl.rollouts import RolloutSource
from flaxchat.tasks.mixtures import rl_eval_task, rl_train_task
from flaxchat.train.generative import make_generative_evaluator
from steps.training import TrainingStage, first_and_last, require_model_input

STAGE = "grpo"
ROW_MULTIPLE = 64          # rollout rows are padded to a multiple of this (one compiled shape per run)


def make_logp_fn(model, params_source: Callable[[], Any]) -> Callable:
    """Jitted per-token log-probs of host rows under the params `params_source()` returns."""
    graphdef, _ = nnx.split(model)

    @jax.jit
    def logp(state, inputs, targets):
        return sequence_logprobs(nnx.merge(graphdef, state), inputs, targets)

    return lambda inputs, targets: logp(params_source(), jnp.asarray(inputs), jnp.asarray(targets))


def row_length(tasks, tokenizer, max_new_tokens: int, sequence_len: int, limit: int = 2000) -> int:
    """Rollout row length: the longest prompt (of the first `limit` of each task, training and
    held-out) + max_new_tokens, rounded up; one length serves rollouts and evaluation."""
    longest = max(len(render_for_completion(tokenizer, task.example(i)))
                  for task in tasks for i in range(min(limit, len(task))))
    if longest + 2 > sequence_len:
        raise ConfigError(f"a GRPO prompt has {longest} tokens, which leaves no room to answer within "
                          f"model.sequence_len={sequence_len}; train the model with a longer sequence_len")
    return min(sequence_len, ROW_MULTIPLE * math.ceil((longest + max_new_tokens) / ROW_MULTIPLE))


def plan_steps(num_steps: int, rl, task_len: int) -> int:
    """-1: rl.num_epochs passes over the training problems, times updates per round."""
    if num_steps > 0:
        return num_steps
    return max(1, rl.num_epochs * task_len // rl.prompts_per_step) * rl.updates_per_batch


def run(config: PipelineConfig, inputs: dict[str, dict[str, Any]], output_uri: str, *,
        resume_from: str | Sequence[str] | None = None, extra_sinks: tuple[Callable, ...] = ()) -> dict[str, Any]:
    rl, tcfg = config.rl, config.grpo
    if tcfg.checkpoint_every % rl.updates_per_batch:
        raise ConfigError(f"grpo.checkpoint_every={tcfg.checkpoint_every} must be a multiple of "
                          f"rl.updates_per_batch={rl.updates_per_batch} (checkpoints fall between rollout rounds)")
    stage = TrainingStage(STAGE, config, tcfg, output_uri, resume_from=resume_from, extra_sinks=extra_sinks)
    tokenizer = stage.open_upstream(require_model_input(inputs, "sft", "pretrain"))
    config = stage.config
    train_task, eval_task = rl_train_task(config), rl_eval_task(config)
    num_steps = plan_steps(tcfg.num_steps, rl, len(train_task))
    if num_steps % rl.updates_per_batch:
        raise ConfigError(f"grpo.num_steps={num_steps} must be a multiple of rl.updates_per_batch="
                          f"{rl.updates_per_batch} (each rollout round trains that many steps)")
    model, _ = stage.build(num_steps)
    row_len = row_length((train_task, eval_task), tokenizer, rl.max_new_tokens, config.model.sequence_len)
    engine = Engine(model, tokenizer, max_len=row_len)
    rows_per_micro = tcfg.device_batch_size * jax.local_device_count()

    logp_fn = make_logp_fn(model, lambda: nnx.state(model)) if rl.updates_per_batch > 1 else None
    ref_logp_fn = None
    if rl.kl_beta > 0:  # the reference is the starting policy (the SFT model), frozen
        ref_state = jax.tree.map(jnp.copy, nnx.state(model))
        ref_logp_fn = make_logp_fn(model, lambda: ref_state)

    def host_fraction(local_units: float) -> float:
        if jax.process_count() == 1:
            return 1.0
        from jax.experimental import multihost_utils
        total = float(np.sum(multihost_utils.process_allgather(np.float32(local_units))))
        return local_units / max(total, 1.0)

    rollouts: list[dict[str, Any]] = []   # per-round statistics for the manifest and card
    sinks = stage.sinks() + [lambda kind, r: rollouts.append(r) if kind == "rollout" else None]
    emit = lambda kind, record: [sink(kind, record) for sink in sinks]  # noqa: E731

    def make_batches(state):
        return RolloutSource(engine, train_task, rl, seed=config.seed, row_len=row_len, rows_per_micro=rows_per_micro,
                             state=state, logp_fn=logp_fn, ref_logp_fn=ref_logp_fn, emit=emit,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             host_fraction=host_fraction)

    probe = make_batches(None)  # validates the sizes before any compile
    evaluate = make_generative_evaluator(
        engine, eval_task, num_problems=rl.eval_problems, num_samples=rl.eval_samples,
        max_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k, seed=config.seed + 1)
    result = stage.train(loss_fn=grpo_loss_fn(rl.clip_low, rl.clip_high, rl.kl_beta), make_batches=make_batches,
                         loop_cfg=stage.loop_config(probe.num_micro, 0), evaluate=evaluate, sinks=sinks)
    rollouts[:0] = stage.carried_rollouts()   # the rounds before the checkpoint it resumed from
    k = rl.eval_samples
    p1_before, p1_after = first_and_last(result.evals, "pass@1")
    pk_before, pk_after = first_and_last(result.evals, f"pass@{k}")
    metrics = {
        "pass@1_initial": p1_before, "pass@1": p1_after, f"pass@{k}_initial": pk_before, f"pass@{k}": pk_after,
        "seed": config.seed, "rounds": num_steps // rl.updates_per_batch, "row_len": row_len,
        "advantage": rl.advantage, "eval_problems": min(rl.eval_problems, len(eval_task)),
        "tokens_seen": int(sum(r["sampled_len"] for r in rollouts) * rl.prompts_per_step * rl.samples_per_prompt),
    }
    for r in rollouts[:-3]:
        r.pop("examples", None)        # keep the manifest small: examples of the last rounds only
    return stage.finish(result, metrics, rollouts=rollouts)


if __name__ == "__main__":
    from steps.common import main
    sys.exit(main(STAGE, run))
