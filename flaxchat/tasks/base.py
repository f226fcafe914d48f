"""The Task container: a sliceable, indexable list of conversations plus how to grade answers.

A task (GSM8K, MMLU, SmolTalk, a user's JSONL file, ...) exposes its examples in nanochat's
conversation format (see flaxchat/chat_format.py) and, where there is an automatic grader, scores
a sampled completion with `evaluate` (1.0 / 0.0) and `reward` (RL; defaults to evaluate).

`TaskMixture` concatenates tasks (each repeated `epochs` times, which is how SFT oversamples a
small task) and shuffles the index list once with a seeded `random.Random`, so the same seed gives
the same order on every host and every rerun, and tasks are interleaved across the whole epoch
rather than visited one after another.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

Conversation = dict[str, Any]


class TaskError(ValueError):
    """A task that cannot be built or used as asked; the message names the problem and the fix."""


class Task:
    """A view `[start:stop:step]` over a subclass's examples.

    Subclasses implement `num_examples()` and `get_example(index)` over their *underlying*
    examples; callers use `len(task)` and `task.example(i)`, which address the slice. A `stop`
    past the end is clamped (so "the first 420 test problems" works for any split size).
    """

    eval_type: str = "generative"  # "generative" (sample then grade) | "categorical" (pick a letter)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if not isinstance(start, int) or start < 0:
            raise TaskError(f"task start={start!r} must be an integer >= 0")
        if stop is not None and (not isinstance(stop, int) or stop < start):
            raise TaskError(f"task stop={stop!r} must be None or an integer >= start={start}")
        if not isinstance(step, int) or step < 1:
            raise TaskError(f"task step={step!r} must be an integer >= 1")
        self.start, self.stop, self.step = start, stop, step

    # ---- what subclasses provide
    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        raise NotImplementedError

    # ---- public API
    @property
    def name(self) -> str:
        return type(self).__name__

    def _range(self) -> range:
        total = self.num_examples()
        stop = total if self.stop is None else min(self.stop, total)
        return range(self.start, max(stop, self.start), self.step)

    def __len__(self) -> int:
        return len(self._range())

    def example(self, i: int) -> Conversation:
        """The i-th conversation of the slice (negative indices are not accepted: they usually
        mean an off-by-one in a data loader, and silently wrapping would hide it)."""
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{self.name}.example index must be an int, got {type(i).__name__}")
        rng = self._range()
        if not 0 <= i < len(rng):
            raise IndexError(f"{self.name}: example {i} out of range for {len(rng)} examples")
        return self.get_example(rng[i])

    def __getitem__(self, i: int) -> Conversation:  # nanochat's spelling: task[i]
        return self.example(i)

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self.example(i)

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        raise TaskError(f"{self.name} has no automatic grader; use it for training only")

    def reward(self, conversation: Conversation, completion: str) -> float:
        return float(self.evaluate(conversation, completion))

    def __repr__(self) -> str:
        return f"{self.name}(len={len(self)})"


def final_assistant_text(conversation: Conversation) -> str:
    """The text of the conversation's last assistant message (text parts joined; tool calls and
    outputs left out), which is where the reference answer lives."""
    messages = conversation.get("messages") or []
    if not messages or messages[-1].get("role") != "assistant":
        raise TaskError("the conversation's last message must be the assistant's reference answer")
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


class TaskMixture(Task):
    """Tasks concatenated (each `epochs` times) and shuffled once with `random.Random(seed)`.

    `TaskMixture([(smoltalk, 1), (mmlu, 3)], seed=42)`; a bare task counts as `(task, 1)`.
    `source(i)` tells which task (its position in the list) and which local index example i
    came from, e.g. for per-task loss logging.
    """

    def __init__(self, tasks: Sequence[Task | tuple[Task, int]], seed: int = 42, **slice_kw: Any):
        super().__init__(**slice_kw)
        self.tasks: list[Task] = []
        self.epochs: list[int] = []
        for entry in tasks:
            task, epochs = (entry, 1) if isinstance(entry, Task) else entry
            if not isinstance(task, Task):
                raise TaskError(f"mixture entries must be Task or (Task, epochs), got {type(task).__name__}")
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise TaskError(f"epochs for {task.name} must be an integer >= 1, got {epochs!r}; "
                                f"leave the task out instead of passing 0")
            self.tasks.append(task)
            self.epochs.append(epochs)
        self.seed = seed
        # (task position, local index) pairs; a flat list of tuples is fine up to a few million
        index: list[tuple[int, int]] = []
        for pos, (task, epochs) in enumerate(zip(self.tasks, self.epochs)):
            n = len(task)
            for _ in range(epochs):
                index.extend((pos, j) for j in range(n))
        if not index:
            names = ", ".join(t.name for t in self.tasks) or "none"
            raise TaskError(f"the task mixture is empty; every task has 0 examples (tasks: {names}) — "
                            f"check the task sources, slices and tasks.* config")
        random.Random(seed).shuffle(index)
        self._index = index

    @property
    def name(self) -> str:
        return "TaskMixture[" + ",".join(f"{t.name}x{e}" for t, e in zip(self.tasks, self.epochs)) + "]"

    def num_examples(self) -> int:
        return len(self._index)

    def get_example(self, index: int) -> Conversation:
        pos, local = self._index[index]
        return self.tasks[pos].example(local)

    def source(self, i: int) -> tuple[int, int]:
        """(position of the task in the mixture list, index within that task) of example i."""
        rng = self._range()
        if not 0 <= i < len(rng):
            raise IndexError(f"{self.name}: example {i} out of range for {len(rng)} examples")
        return self._index[rng[i]]

    def task_of(self, i: int) -> Task:
        return self.tasks[self.source(i)[0]]

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        raise TaskError("a TaskMixture has no single grader; evaluate with task_of(i).evaluate(...)")
