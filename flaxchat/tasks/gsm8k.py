"""GSM8K grade-school word problems (openai/gsm8k, config `main`) as tool-using conversations.

A reference solution annotates each calculation as `<<expr=value>>`, e.g.

    Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.
    #### 10

As nanochat does, every annotation becomes a calculator call: a `python` part holding `expr` and a
`python_output` part holding `value`; the prose around them (including the value repeated after
the annotation, and the final `#### N` line) stays as text parts. The model therefore learns to
call the tool, and at inference the engine writes the real tool output where `value` was.

Grading (nanochat's, after OpenAI's grade-school-math): the number after `#### ` in the completion,
commas removed, must equal the reference's as a string ("18" == "18", but "18.0" != "18").
"""

from __future__ import annotations

import json
import re
from typing import Any

from flaxchat.tasks.base import Conversation, TaskError, final_assistant_text
from flaxchat.tasks.hf import HFTask

# nanochat's pattern: an optional minus, then digits, dots and commas
_ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
_ANNOTATION_RE = re.compile(r"<<([^>]+)>>")


def extract_answer(text: str) -> str | None:
    """The number after the first `#### ` with commas removed ("1,000" -> "1000"), or None."""
    match = _ANSWER_RE.search(text)
    if not match:
        return None
    return match.group(1).strip().replace(",", "")


def tool_parts(answer: str) -> list[dict[str, str]]:
    """Split a GSM8K-style solution into text / python / python_output parts.

    An annotation without '=' (rare) becomes a call with an empty output, as in nanochat. Empty
    text parts are dropped (nanochat keeps them; they render to no tokens either way).
    """
    parts: list[dict[str, str]] = []
    pos = 0
    for match in _ANNOTATION_RE.finditer(answer):
        if match.start() > pos:
            parts.append({"type": "text", "text": answer[pos:match.start()]})
        inner = match.group(1)
        # split at the LAST '=' (the value never contains one; an expression could, e.g. "a=b=3")
        expr, value = inner.rsplit("=", 1) if "=" in inner else (inner, "")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": value})
        pos = match.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def gsm8k_conversation(question: str, answer: str) -> Conversation:
    """The user asks `question`; the assistant answers with `answer` split into tool parts."""
    if not isinstance(question, str) or not isinstance(answer, str):
        raise TaskError("a GSM8K-style problem needs string 'question' and 'answer' fields")
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": tool_parts(answer)},
        ],
    }


def grade_numeric(conversation: Conversation, completion: str) -> float:
    """1.0 when the completion's `#### N` equals the reference's, else 0.0 (None never matches)."""
    if not isinstance(completion, str):
        raise TaskError(f"completion must be a string, got {type(completion).__name__}")
    reference = extract_answer(final_assistant_text(conversation))
    if reference is None:
        raise TaskError("the reference answer has no '#### N' line to grade against")
    return 1.0 if extract_answer(completion) == reference else 0.0


class GSM8K(HFTask):
    """openai/gsm8k (`main` or `socratic`), split train (7,473) or test (1,319)."""

    repo = "openai/gsm8k"
    eval_type = "generative"

    def __init__(self, split: str = "train", config: str = "main", **kw: Any):
        if config not in ("main", "socratic"):
            raise TaskError(f"GSM8K config {config!r} must be 'main' or 'socratic'")
        if split not in ("train", "test"):
            raise TaskError(f"GSM8K split {split!r} must be 'train' or 'test'")
        super().__init__(config, split, **kw)

    @classmethod
    def from_jsonl(cls, path: str, split: str = "test", **kw: Any) -> "GSM8K":
        """Problems from a local (or gs://) JSONL file with `question` and `answer` per line,
        in file order (no shuffle unless shuffle_seed is given)."""
        from flaxchat import storage
        rows = []
        for lineno, line in enumerate(storage.read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise TaskError(f"{path}:{lineno}: not valid JSON ({e}); write one object per line") from e
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                    or not isinstance(row.get("answer"), str):
                raise TaskError(f"{path}:{lineno}: needs string fields 'question' and 'answer'")
            rows.append(row)
        kw.setdefault("shuffle_seed", None)
        return cls(split=split, rows=rows, **kw)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return gsm8k_conversation(row["question"], row["answer"])

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        return grade_numeric(conversation, completion)
