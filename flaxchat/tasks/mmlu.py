"""MMLU (cais/mmlu) as lettered multiple choice, plus the rendering ARC shares.

Rendering follows nanochat's `render_mc` (not "A. choice"): each choice is followed by its letter,
`- choice=A`, with no space before the letter, and the assistant answers with the bare letter.
The reason (nanochat's): small models bind a letter better when it comes after the choice, and
"A" and " A" are different tokens, so the letter in the prompt must be the very token the
assistant is trained to emit.

Evaluation is "categorical": the eval loop restricts the model to the letters in the
conversation's `letters` key and passes the chosen letter as the completion; a free-form
completion is also accepted when it starts with a lone letter ("B", "B.", "B) because ...").
Configs: `all` has splits auxiliary_train (99,842 rows, nanochat's SFT data), dev, validation and
test (14,042).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from flaxchat.tasks.base import Conversation, TaskError
from flaxchat.tasks.hf import HFTask

LETTERS = ("A", "B", "C", "D")
_LEADING_LETTER = re.compile(r"\s*([A-Za-z])(?![A-Za-z])")


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, choices: Sequence[str], letters: Sequence[str], gold: str,
                    **extra: Any) -> Conversation:
    if len(choices) != len(letters) or gold not in letters:
        raise TaskError(f"multiple-choice row is inconsistent: {len(choices)} choices, letters "
                        f"{list(letters)}, answer {gold!r}")
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": gold},
        ],
        "letters": list(letters),
        **extra,
    }


def extract_letter(completion: str, letters: Sequence[str]) -> str | None:
    """The letter a completion picks: the completion itself when it is one of `letters`, else a
    lone leading letter (case-sensitive match against `letters`), else None."""
    text = completion.strip()
    if text in letters:
        return text
    match = _LEADING_LETTER.match(text)
    return match.group(1) if match and match.group(1) in letters else None


def grade_letter(conversation: Conversation, completion: str) -> float:
    if not isinstance(completion, str):
        raise TaskError(f"completion must be a string, got {type(completion).__name__}")
    gold = conversation["messages"][-1]["content"]
    return 1.0 if extract_letter(completion, conversation["letters"]) == gold else 0.0


class MMLU(HFTask):
    repo = "cais/mmlu"
    eval_type = "categorical"

    def __init__(self, split: str = "test", config: str = "all", **kw: Any):
        if split not in ("auxiliary_train", "dev", "validation", "test"):
            raise TaskError(f"MMLU split {split!r} must be auxiliary_train, dev, validation or test")
        super().__init__(config, split, **kw)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        # the standalone auxiliary_train config nests each row under "train"; accept both shapes
        if "question" not in row and isinstance(row.get("train"), dict):
            row = row["train"]
        choices, answer = list(row["choices"]), int(row["answer"])
        if len(choices) != len(LETTERS) or not 0 <= answer < len(LETTERS):
            raise TaskError(f"MMLU row {index} has {len(choices)} choices / answer {answer}; expected 4 and 0..3")
        return mc_conversation(row["question"], choices, LETTERS, LETTERS[answer],
                               subject=row.get("subject", ""))

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        return grade_letter(conversation, completion)
