"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat for SFT, ~460K train / ~24K test rows.

The "smol" variant is the one sized for small models (nanochat's choice). Rows are used as given:
an optional leading system message (the renderer merges it into the first user turn), then
strictly alternating user / assistant string messages. A row breaking that shape is an error
naming the row rather than a silently skipped example, since it would mean the dataset changed.
There is no automatic grader: SmolTalk is training (and validation-loss) data only.
"""

from __future__ import annotations

from typing import Any

from flaxchat.tasks.base import Conversation, TaskError
from flaxchat.tasks.hf import HFTask


class SmolTalk(HFTask):
    repo = "HuggingFaceTB/smol-smoltalk"
    eval_type = "generative"

    def __init__(self, split: str = "train", config: str = "default", **kw: Any):
        if split not in ("train", "test"):
            raise TaskError(f"SmolTalk split {split!r} must be 'train' or 'test'")
        super().__init__(config, split, **kw)

    def get_example(self, index: int) -> Conversation:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        body = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if len(body) < 2:
            raise TaskError(f"SmolTalk row {index} has {len(body)} non-system messages; need at least 2")
        for i, m in enumerate(body):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want or not isinstance(m["content"], str):
                raise TaskError(f"SmolTalk row {index} message {i} is {m['role']!r}; expected a string "
                                f"{want!r} message (user/assistant must alternate)")
        return {"messages": messages}

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        raise TaskError("SmolTalk has no automatic grader; use it for training and validation loss only")
