"""Offline demo tasks over the generated demo corpus (flaxchat/data/demo_corpus.py).

The `demo` preset runs the whole pipeline with nothing downloaded:
* DemoChat: small-talk, story and calculator chats from `generate_conversations`; training data
  only (no grader).
* DemoMath: word problems from `generate_math_problems`, rendered exactly like GSM8K through
  `gsm8k_conversation` (`<<expr=value>>` annotations become python / python_output parts, the
  answer ends with `#### N`), graded by exact match of the number after ####; SFT trains on it
  and GRPO samples and rewards it.

Train and validation never overlap. The validation split is generated from a different seed,
`seed + VAL_SEED_OFFSET` (a prime far above any example count, so the two random streams are
unrelated), and because the generators draw from a small space of templates, the same item can
still come out of both streams by chance: the validation split therefore also skips every item
that occurs among the first `train_n` training items of the same seed (key: the question for
DemoMath, the whole conversation for DemoChat) and generates on until it has `n` items.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from flaxchat.tasks.base import Conversation, Task, TaskError
from flaxchat.tasks.gsm8k import grade_numeric, gsm8k_conversation

VAL_SEED_OFFSET = 1_000_003


def val_seed(seed: int) -> int:
    return int(seed) + VAL_SEED_OFFSET


def _split_items(generate: Callable[[int, int], list], key: Callable[[Any], str], seed: int, n: int,
                 split: str, train_n: int) -> list:
    if split == "train":
        return generate(seed, n)
    if split != "val":
        raise TaskError(f"demo task split {split!r} must be 'train' or 'val'")
    seen = {key(item) for item in generate(seed, train_n)} if train_n else set()
    out: list = []
    want = n
    while True:
        # generation is a prefix-stable stream: asking for more items extends the same sequence
        want = 2 * want + 16
        items = [it for it in generate(val_seed(seed), want) if key(it) not in seen]
        out = items[:n]
        if len(out) == n or want > 64 * n + 4096:
            break
    if len(out) < n:
        raise TaskError(f"could not generate {n} demo validation items distinct from {train_n} training "
                        f"items; lower tasks.demo_val")
    return out


class DemoChat(Task):
    eval_type = "generative"

    def __init__(self, seed: int, n: int, *, split: str = "train", train_n: int = 0, **slice_kw: Any):
        from flaxchat.data.demo_corpus import generate_conversations
        super().__init__(**slice_kw)
        self.seed, self.split = seed, split
        self.items = _split_items(generate_conversations, lambda c: json.dumps(c, sort_keys=True),
                                  seed, n, split, train_n)

    def num_examples(self) -> int:
        return len(self.items)

    def get_example(self, index: int) -> Conversation:
        return self.items[index]

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        raise TaskError("DemoChat has no automatic grader; grade the demo with DemoMath")


class DemoMath(Task):
    eval_type = "generative"

    def __init__(self, seed: int, n: int, *, split: str = "train", train_n: int = 0, **slice_kw: Any):
        from flaxchat.data.demo_corpus import generate_math_problems
        super().__init__(**slice_kw)
        self.seed, self.split = seed, split
        self.items = _split_items(generate_math_problems, lambda p: p["question"], seed, n, split, train_n)

    def num_examples(self) -> int:
        return len(self.items)

    def get_example(self, index: int) -> Conversation:
        problem = self.items[index]
        conversation = gsm8k_conversation(problem["question"], problem["answer_text"])
        conversation["answer"] = problem["answer"]
        return conversation

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        return grade_numeric(conversation, completion)
