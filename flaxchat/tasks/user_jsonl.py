"""A user's own conversations from a JSONL file (nanochat's CustomJSON), e.g. identity chats.

One conversation per non-blank line, either `{"messages": [...]}` (other top-level keys are kept)
or a bare list of messages. Messages: an optional leading system message, then user / assistant
alternating, starting with user and ending with assistant. User and system content is a string;
assistant content is a string or a list of parts `{"type": "text"|"python"|"python_output",
"text": str}`. The whole file is validated when the task is built, and the first bad line is
reported as `path:line: what is wrong` so it can be fixed in an editor, instead of failing
(or silently training on garbage) hours into SFT.

Paths may be local or gs:// (read through flaxchat.storage). The example file shipped next to this
module, identity.jsonl, teaches the model who it is; IDENTITY_JSONL is its path.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flaxchat.tasks.base import Conversation, Task, TaskError

IDENTITY_JSONL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity.jsonl")
_PART_TYPES = ("text", "python", "python_output")


def _problem(messages: Any) -> str | None:
    """What is wrong with a message list, or None when it is a valid conversation."""
    if not isinstance(messages, list):
        return f"expected a list of messages or an object with a 'messages' list, got {type(messages).__name__}"
    body = messages[1:] if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" \
        else messages
    if len(body) < 2:
        return f"a conversation needs at least a user and an assistant message, got {len(body)}"
    if len(body) < len(messages) and not isinstance(messages[0].get("content"), str):
        return "the system message's content must be a string"
    for i, m in enumerate(body):
        n = i + len(messages) - len(body)  # position in the list as written
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {n} must be an object with 'role' and 'content'"
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            return f"message {n} has role {m['role']!r} but should be {want!r} (user and assistant alternate)"
        content = m["content"]
        if want == "user" and not isinstance(content, str):
            return f"message {n}: user content must be a string"
        if want == "assistant" and not isinstance(content, str):
            if not isinstance(content, list) or not content:
                return f"message {n}: assistant content must be a string or a non-empty list of parts"
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in _PART_TYPES \
                        or not isinstance(part.get("text"), str):
                    return (f"message {n}: each part must be {{\"type\": one of {list(_PART_TYPES)}, "
                            f"\"text\": string}}, got {json.dumps(part)[:80]}")
    if body[-1]["role"] != "assistant":
        return "the last message must be the assistant's (it is what SFT trains on)"
    return None


def parse_user_jsonl(text: str, path: str = "<text>") -> list[Conversation]:
    conversations = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise TaskError(f"{path}:{lineno}: not valid JSON ({e}); write one conversation per line") from e
        conversation = value if isinstance(value, dict) else {"messages": value}
        problem = _problem(conversation.get("messages"))
        if problem:
            raise TaskError(f"{path}:{lineno}: {problem}")
        conversations.append(conversation)
    return conversations


class UserJSONL(Task):
    eval_type = "generative"

    def __init__(self, path: str, **slice_kw: Any):
        super().__init__(**slice_kw)
        from flaxchat import storage
        self.path = str(path)
        try:
            text = storage.read_text(self.path)
        except FileNotFoundError as e:
            raise TaskError(f"user conversations file {self.path} does not exist; fix tasks.user_jsonl "
                            f"or leave it empty") from e
        self.conversations = parse_user_jsonl(text, self.path)

    @property
    def name(self) -> str:
        return f"UserJSONL({os.path.basename(self.path)})"

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return self.conversations[index]
