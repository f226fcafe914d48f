"""Generative evaluation during training: sample answers to held-out problems, grade them, pass@k.

SFT reports a small greedy check of this kind at its eval interval; GRPO reports pass@1..pass@k
at temperature 1.0 / top-k 50 (nanochat's chat_rl evaluation). Problems go through the compiled
batched engine with tool use, all of them in one `generate` call, so nothing recompiles between
intervals (the engine is built once and reads the model's current params at each call).

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c are right,
pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems.
"""

from __future__ import annotations

from math import comb
from typing import Any, Callable, Protocol

import numpy as np

from flaxchat.chat_format import render_for_completion


class GradedTask(Protocol):
    def __len__(self) -> int: ...

    def example(self, i: int) -> dict[str, Any]: ...

    def reward(self, conversation: dict[str, Any], completion: str) -> float: ...


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn (without replacement) from n is right."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def make_generative_evaluator(engine, task: GradedTask, *, num_problems: int, num_samples: int,
                              max_tokens: int, temperature: float, top_k: int, seed: int,
                              prefix: str = "", keep_examples: int = 4
                              ) -> Callable[[Any], dict[str, Any]]:
    """evaluate(model) -> {"{prefix}pass@1": …, "{prefix}pass@k": …, "{prefix}examples": [...]}.
    The same problems and sampling seed at every call, so successive values are comparable."""
    n = min(num_problems, len(task))
    if n < 1:
        raise ValueError("the held-out task is empty; add problems or lower the eval settings")
    conversations = [task.example(i) for i in range(n)]
    prompts = [render_for_completion(engine.tokenizer, c) for c in conversations]
    # a prompt needs room to answer in the engine's max_len (the model's sequence_len)
    fits = [i for i, p in enumerate(prompts) if len(p) + 2 <= engine.max_len]
    if not fits:
        raise ValueError(f"none of the {n} held-out prompts ({min(map(len, prompts))}+ tokens) leaves room to "
                         f"answer within max_len={engine.max_len}; raise model.sequence_len")
    conversations, prompts = [conversations[i] for i in fits], [prompts[i] for i in fits]
    ks = sorted({1, *[k for k in (2, 4, 8, 16, 32) if k <= num_samples], num_samples})

    def evaluate(model: Any) -> dict[str, Any]:
        outs = engine.generate(prompts, num_samples=num_samples, max_tokens=max_tokens,
                               temperature=temperature, top_k=top_k, seed=seed)
        correct = np.array([[task.reward(conv, c.text) > 0 for c in samples]
                            for conv, samples in zip(conversations, outs)])
        record: dict[str, Any] = {f"{prefix}pass@{k}": float(np.mean([pass_at_k(num_samples, int(row.sum()), k)
                                                                      for row in correct])) for k in ks}
        record[f"{prefix}problems"] = len(prompts)
        record[f"{prefix}examples"] = [
            {"prompt": conv["messages"][-2]["content"] if len(conv["messages"]) > 1 else "",
             "completion": samples[0].text, "correct": bool(row[0])}
            for conv, samples, row in list(zip(conversations, outs, correct))[:keep_examples]]
        return record

    return evaluate
