"""DemoChoice: lettered multiple choice over the demo corpus's animal facts (offline ARC/MMLU stand-in).

The `demo` preset has no MMLU or ARC to download, so the chat evaluation's categorical path runs on
questions generated from the facts the demo corpus teaches (flaxchat/data/demo_corpus.py): LEGS,
SOUNDS and HOMES, asked with the corpus's own phrasing ("How many legs does a spider have?").
Each item offers 4 distinct options (the fact plus 3 other values of the same table, in random
order) and is rendered exactly like MMLU/ARC through `mc_conversation` (nanochat's `render_mc`:
"- choice=A" lines, the assistant answers with the bare letter), so `letters` is ["A","B","C","D"]
and grading is `grade_letter`. eval_type is "categorical".

Items are a pure function of (seed, split, n): a string-seeded random.Random per (seed, split), so
the same arguments give the same items on every host. There are only 33 facts, so with n in the
hundreds each question repeats with different distractors and option orders; "train" and "test"
draw from independent streams but share the facts (like SpellingBee's built-in word list, the
test measures recall of seen facts, not generalisation).
"""

from __future__ import annotations

import random
from typing import Any

from flaxchat.tasks.base import Conversation, Task, TaskError
from flaxchat.tasks.mmlu import LETTERS, grade_letter, mc_conversation

DEMO_CHOICE_VERSION = 1


def _facts() -> list[tuple[str, str, list[str]]]:
    """(question, answer, all values of that table) for every fact, in a fixed order."""
    from flaxchat.data.demo_corpus import HOMES, LEGS, SOUNDS, _a
    legs = sorted({str(v) for v in LEGS.values()}, key=int)
    sounds = sorted(set(SOUNDS.values()))
    homes = sorted(set(HOMES.values()))
    facts = [(f"How many legs does {_a(k)} have?", str(LEGS[k]), legs) for k in sorted(LEGS)]
    facts += [(f"What sound does {_a(k)} make?", SOUNDS[k], sounds) for k in sorted(SOUNDS)]
    facts += [(f"Where does {_a(k)} live?", HOMES[k], homes) for k in sorted(HOMES)]
    return facts


def generate_choice_items(seed: int, n: int, split: str = "test") -> list[dict[str, Any]]:
    """`n` items {question, choices (4), answer (the gold letter)}."""
    if split not in ("train", "test"):
        raise TaskError(f"DemoChoice split {split!r} must be 'train' or 'test'")
    if n < 0:
        raise TaskError(f"DemoChoice n={n} must be >= 0")
    facts = _facts()
    rng = random.Random(f"flaxchat-demochoice-v{DEMO_CHOICE_VERSION}-{int(seed)}-{split}")
    items = []
    for _ in range(int(n)):
        question, answer, values = rng.choice(facts)
        distractors = rng.sample([v for v in values if v != answer], len(LETTERS) - 1)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"question": question, "choices": choices, "answer": LETTERS[choices.index(answer)]})
    return items


class DemoChoice(Task):
    """`DemoChoice(seed, n)`: n generated 4-way multiple-choice questions (see the module docstring)."""

    eval_type = "categorical"

    def __init__(self, seed: int, n: int, *, split: str = "test", **slice_kw: Any):
        super().__init__(**slice_kw)
        self.seed, self.split = seed, split
        self.items = generate_choice_items(seed, n, split)

    def num_examples(self) -> int:
        return len(self.items)

    def get_example(self, index: int) -> Conversation:
        item = self.items[index]
        return mc_conversation(item["question"], item["choices"], LETTERS, item["answer"])

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        return grade_letter(conversation, completion)
