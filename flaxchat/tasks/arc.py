"""ARC (allenai/ai2_arc, configs ARC-Easy / ARC-Challenge) as lettered multiple choice.

Same rendering and grading as MMLU (see mmlu.py). ARC rows carry their own labels, usually A-D
but sometimes 3 or 5 choices or digit labels "1".."4"; the row's labels are used as given, so the
assistant answers with the row's `answerKey` and `letters` lists exactly the row's labels.
"""

from __future__ import annotations

from typing import Any

from flaxchat.tasks.base import Conversation, TaskError
from flaxchat.tasks.hf import HFTask
from flaxchat.tasks.mmlu import grade_letter, mc_conversation


class ARC(HFTask):
    repo = "allenai/ai2_arc"
    eval_type = "categorical"

    def __init__(self, config: str = "ARC-Easy", split: str = "test", **kw: Any):
        if config not in ("ARC-Easy", "ARC-Challenge"):
            raise TaskError(f"ARC config {config!r} must be 'ARC-Easy' or 'ARC-Challenge'")
        if split not in ("train", "validation", "test"):
            raise TaskError(f"ARC split {split!r} must be train, validation or test")
        super().__init__(config, split, **kw)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        choices = row["choices"]
        return mc_conversation(row["question"], list(choices["text"]), [str(x) for x in choices["label"]],
                               str(row["answerKey"]))

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        return grade_letter(conversation, completion)
