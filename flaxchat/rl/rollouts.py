"""GRPO's batch source: sample rollouts with the current policy, grade them, lay them out as rows.

For the one training loop a rollout round is just a batch source. Round r:
  1. takes the next P prompts of the training task (a (seed, epoch) permutation of it, so the
     prompt cursor is the round number; process p of n takes its P/n share),
  2. samples G completions of each through the compiled batched engine WITH tool use
     (temperature/top-k from the config; the sampling seed is a function of (seed, r, p)),
  3. grades each with the task's reward, turns rewards into advantages per group,
  4. lays each sample out as one row: prompt + completion, targets -1 on the prompt, on forced
     tool output and on padding, so only sampled tokens carry loss,
  5. hands out its micro-batches `updates_per_batch` times (one optimizer step each: PPO-style
     reuse; `old_logp` is the sampling policy's log-prob, computed once per round when reused).
The resumable position is the round number: rollouts are a pure function of (params, round),
and checkpoints fall on round boundaries (steps/grpo.py checks), so a resumed run samples the
same round from the same params, bitwise.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

import jax
import numpy as np

from flaxchat.chat_format import render_for_completion
from flaxchat.rl.advantages import compute_advantages, token_weights


def completion_row(prompt: list[int], tokens: list[int], forced: list[int], row_len: int, pad_id: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs (row_len,), targets (row_len,), sampled mask over targets) of one rollout; targets
    are -1 wherever the model was not the author (prompt, forced tool output, padding)."""
    ids = np.full(row_len + 1, pad_id, np.int32)
    author = np.zeros(row_len + 1, np.int8)
    seq = (list(prompt) + list(tokens))[:row_len + 1]
    ids[:len(seq)] = seq
    n = min(len(tokens), row_len + 1 - len(prompt))
    if n > 0:
        author[len(prompt):len(prompt) + n] = 1 - np.asarray(forced[:n], np.int8)
    targets = np.where(author[1:] == 1, ids[1:], -1).astype(np.int32)
    return ids[:-1].copy(), targets, author[1:].copy()


class RolloutSource:
    """See the module docstring. `logp_fn(inputs, targets)` / `ref_logp_fn` give per-token log-probs
    (B,T) under the current / reference policy (None: not needed); `emit(kind, record)` reports."""

    def __init__(self, engine, task, rl, *, seed: int, row_len: int, rows_per_micro: int,
                 state: dict[str, Any] | None = None, logp_fn: Callable | None = None,
                 ref_logp_fn: Callable | None = None, emit: Callable[[str, dict], None] = lambda k, r: None,
                 process_index: int = 0, process_count: int = 1, host_fraction: Callable[[float], float] | None = None):
        self.engine, self.task, self.rl, self.seed = engine, task, rl, seed
        self.row_len, self.rows_per_micro = row_len, rows_per_micro
        self.logp_fn, self.ref_logp_fn, self.emit = logp_fn, ref_logp_fn, emit
        self.process_index, self.process_count = process_index, process_count
        self.host_fraction = host_fraction or (lambda x: 1.0)
        self.local_prompts = rl.prompts_per_step // process_count
        rows = self.local_prompts * rl.samples_per_prompt
        if rl.prompts_per_step % process_count or rows % rows_per_micro:
            raise ValueError(f"rl.prompts_per_step={rl.prompts_per_step} x samples_per_prompt={rl.samples_per_prompt} "
                             f"must split evenly over {process_count} processes and into micro-batches of "
                             f"{rows_per_micro} rows; change grpo.device_batch_size or the rl sizes")
        self.num_micro = rows // rows_per_micro
        self.round = int((state or {}).get("round", 0))
        self._handed = 0          # micro-batches handed out since `round` began
        self._orders: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ position
    @property
    def micro_per_round(self) -> int:
        return self.num_micro * self.rl.updates_per_batch

    def state_dict(self) -> dict[str, Any]:
        if self._handed % self.micro_per_round:
            raise RuntimeError("a GRPO checkpoint must fall on a rollout-round boundary; make "
                               "grpo.checkpoint_every a multiple of rl.updates_per_batch")
        return {"round": self.round + self._handed // self.micro_per_round}

    def prompt_indices(self, round_: int) -> list[int]:
        """This process's task indices for a round: a cursor over (seed, epoch) permutations."""
        n = len(self.task)
        start = round_ * self.rl.prompts_per_step + self.process_index * self.local_prompts
        out = []
        for k in range(start, start + self.local_prompts):
            epoch, i = divmod(k, n)
            if epoch not in self._orders:
                order = list(range(n))
                random.Random(f"grpo-{self.seed}-{epoch}").shuffle(order)
                self._orders = {epoch: order}
            out.append(self._orders[epoch][i])
        return out

    # ------------------------------------------------------------------ one round
    def rollout(self, round_: int) -> list[dict[str, np.ndarray]]:
        rl, G = self.rl, self.rl.samples_per_prompt
        conversations = [self.task.example(i) for i in self.prompt_indices(round_)]
        prompts = [render_for_completion(self.engine.tokenizer, c) for c in conversations]
        outs = self.engine.generate(prompts, num_samples=G, max_tokens=rl.max_new_tokens,
                                    temperature=rl.temperature, top_k=rl.top_k,
                                    seed=((self.seed * 1_000_003 + round_) * 4099 + self.process_index) % (1 << 31))
        rewards = np.array([[self.task.reward(conv, c.text) for c in samples]
                            for conv, samples in zip(conversations, outs)], np.float32)
        adv = compute_advantages(rewards, rl.advantage).reshape(-1)
        pad = self.engine.tokenizer.bos_token_id
        laid = [completion_row(p, c.tokens, c.forced, self.row_len, pad) for p, samples in zip(prompts, outs)
                for c in samples]
        inputs, targets, mask = (np.stack(x) for x in zip(*laid))
        unit = mask.sum() if rl.loss_aggregation == "token_mean" else len(mask)
        weights = token_weights(mask, rl.loss_aggregation, self.num_micro) * self.host_fraction(float(unit))
        self._report(round_, rewards, outs, conversations)
        micro = []
        for m in range(self.num_micro):
            sl = slice(m * self.rows_per_micro, (m + 1) * self.rows_per_micro)
            mb = {"inputs": inputs[sl], "targets": targets[sl], "advantages": adv[sl].astype(np.float32),
                  "weights": weights[sl].astype(np.float32)}
            if self.logp_fn is not None:
                mb["old_logp"] = np.asarray(self.logp_fn(mb["inputs"], mb["targets"]))
            if self.ref_logp_fn is not None:
                mb["ref_logp"] = np.asarray(self.ref_logp_fn(mb["inputs"], mb["targets"]))
            micro.append(mb)
        return micro

    def _report(self, round_: int, rewards: np.ndarray, outs, conversations) -> None:
        py = self.engine.tokenizer.encode_special("<|python_start|>")
        flat = [c for samples in outs for c in samples]
        sampled = [len(c.tokens) - sum(c.forced) for c in flat]
        calls = [sum(1 for t, f in zip(c.tokens, c.forced) if t == py and not f) for c in flat]
        examples = [{"prompt": conv["messages"][-2]["content"], "completion": samples[0].text,
                     "reward": float(r[0])} for conv, samples, r in list(zip(conversations, outs, rewards))[:3]]
        self.emit("rollout", {"step": round_ * self.rl.updates_per_batch, "round": round_,
                              "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                              "sampled_len": float(np.mean(sampled)), "tool_calls": float(np.mean(calls)),
                              "examples": examples})

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            micro = self.rollout(self.round)
            for _ in range(self.rl.updates_per_batch):
                for mb in micro:
                    self._handed += 1
                    yield mb
            self.round += 1
            self._handed = 0
