"""HumanEval (openai/openai_humaneval, 164 problems) as a chat task graded in the sandbox.

The user message is the problem's prompt (signature + docstring); the reference assistant message
is the whole function, prompt then canonical body (as nanochat does), because a chat model answers
with a complete function rather than a continuation. Grading extracts the program from the
completion (the first ```python fenced block, else the whole text), puts the prompt's imports in
front, runs the problem's tests via flaxchat.sandbox.humaneval.run_humaneval in the sandbox and scores
1.0 when they pass. Problems can also come from a local HumanEval.jsonl(.gz).
"""

from __future__ import annotations

import gzip
import json
import re
from typing import Any

from flaxchat.tasks.base import Conversation, TaskError
from flaxchat.tasks.hf import HFTask

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)\n?```", re.DOTALL)
_FIELDS = ("prompt", "canonical_solution", "test", "entry_point")


def extract_program(completion: str) -> str:
    """The first fenced code block of a completion, or the whole completion when it has none."""
    match = _FENCE.search(completion)
    return (match.group(1) if match else completion).strip("\n")


def read_humaneval_jsonl(path: str) -> list[dict]:
    """Problems from a HumanEval .jsonl or .jsonl.gz (local or gs://)."""
    from flaxchat import storage
    data = storage.read_bytes(path)
    text = (gzip.decompress(data) if path.endswith(".gz") else data).decode("utf-8")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TaskError(f"{path}:{lineno}: not valid JSON ({e})") from e
        missing = [f for f in _FIELDS if not isinstance(row.get(f), str)]
        if missing:
            raise TaskError(f"{path}:{lineno}: HumanEval problem lacks string field(s) {missing}")
        rows.append(row)
    return rows


class HumanEval(HFTask):
    repo = "openai/openai_humaneval"
    eval_type = "generative"

    def __init__(self, path: str | None = None, *, run_timeout_s: float = 5.0, **kw: Any):
        # the hub's only config/split for this dataset is openai_humaneval/test
        if path is not None:
            kw.setdefault("shuffle_seed", None)  # a local file keeps its order (HumanEval/0 first)
            kw["rows"] = read_humaneval_jsonl(path)
        super().__init__("openai_humaneval", "test", **kw)
        self.run_timeout_s = run_timeout_s  # per-program sandbox limit

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "task_id": row.get("task_id", ""),
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        from flaxchat.sandbox.humaneval import run_humaneval
        if not isinstance(completion, str):
            raise TaskError(f"completion must be a string, got {type(completion).__name__}")
        problem = {"prompt": conversation["messages"][0]["content"], "test": conversation["test"],
                   "entry_point": conversation["entry_point"]}
        result = run_humaneval(problem, extract_program(completion), timeout_s=self.run_timeout_s,
                               completion_is_full_function=True)
        return 1.0 if result.ok else 0.0
