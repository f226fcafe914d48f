"""Render chat conversations into token ids plus a training mask (nanochat's chat format).

A conversation is ``{"messages": [{"role": ..., "content": ...}, ...]}``. The rendering is

    <|bos|> <|user_start|> user text <|user_end|>
            <|assistant_start|> text | <|python_start|> code <|python_end|>
                                     | <|output_start|> tool output <|output_end|> ... <|assistant_end|>
            ...

The mask is 1 exactly on what the model should learn to produce: assistant text, python calls
(with their delimiters) and <|assistant_end|>. Everything the model is given rather than asked to
produce gets 0: <|bos|>, user turns, <|assistant_start|> (the prompt supplies it at inference) and
tool outputs (python writes those at inference time, so supervising them would teach the model to
hallucinate results). A leading system message is merged into the first user turn, as nanochat
does, because the format has no system role.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flaxchat.tokenizer import Tokenizer

_GREEN, _RED, _GRAY, _RESET = "\033[92m", "\033[91m", "\033[90m", "\033[0m"


def _merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold a leading system message into the following user message (without mutating input)."""
    if not messages or messages[0].get("role") != "system":
        return messages
    if len(messages) < 2 or messages[1].get("role") != "user":
        raise ValueError("a system message must be followed by a user message; "
                         "put the user turn right after it or drop the system message")
    system, user = messages[0]["content"], messages[1]["content"]
    if not isinstance(system, str) or not isinstance(user, str):
        raise ValueError("system and user message content must be strings")
    merged = {**messages[1], "content": system + "\n\n" + user}
    return [merged, *messages[2:]]


def render_conversation(tokenizer: Tokenizer, conversation: dict,
                        max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """(ids, mask) of `conversation`, both cut to `max_tokens`; see the module docstring."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation must be a dict with a non-empty 'messages' list")
    messages = _merge_system(messages)

    special = tokenizer.encode_special
    user_start, user_end = special("<|user_start|>"), special("<|user_end|>")
    assistant_start, assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
    python_start, python_end = special("<|python_start|>"), special("<|python_end|>")
    output_start, output_end = special("<|output_start|>"), special("<|output_end|>")

    ids: list[int] = [tokenizer.bos_token_id]
    mask: list[int] = [0]

    def add(token_ids: list[int], supervised: int) -> None:
        ids.extend(token_ids)
        mask.extend([supervised] * len(token_ids))

    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        role = message.get("role")
        if role != expected:
            raise ValueError(
                f"message {index} (after merging any system message) has role {role!r} but must be "
                f"{expected!r}: conversations alternate user/assistant, starting with user")
        content = message.get("content")
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {index}: user content must be a string, got {type(content).__name__}")
            add([user_start, *tokenizer.encode(content), user_end], 0)
            continue

        add([assistant_start], 0)
        if isinstance(content, str):
            add(tokenizer.encode(content), 1)
        elif isinstance(content, list):
            for part in content:
                kind, text = part.get("type"), part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"message {index}: every part needs a string 'text', got {part!r}")
                if kind == "text":
                    add(tokenizer.encode(text), 1)
                elif kind == "python":
                    add([python_start, *tokenizer.encode(text), python_end], 1)
                elif kind == "python_output":
                    add([output_start, *tokenizer.encode(text), output_end], 0)
                else:
                    raise ValueError(f"message {index}: unknown part type {kind!r}; "
                                     f"use 'text', 'python' or 'python_output'")
        else:
            raise ValueError(f"message {index}: assistant content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
        add([assistant_end], 1)

    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer: Tokenizer, conversation: dict) -> list[int]:
    """Prompt for sampling: drop the final assistant message, end with <|assistant_start|>.

    Unlike nanochat this does not crop the prompt to 2048 tokens: a cropped prompt followed by
    <|assistant_start|> would be malformed, so length limits are left to the caller.
    """
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
        raise ValueError("render_for_completion needs a conversation whose last message is from "
                         "the assistant (it is dropped and the model asked to write it)")
    prompt = {**conversation, "messages": messages[:-1]}
    ids, _ = render_conversation(tokenizer, prompt, max_tokens=sys.maxsize)
    ids.append(tokenizer.encode_special("<|assistant_start|>"))
    return ids


def visualize(tokenizer: Tokenizer, ids: list[int], mask: list[int], with_ids: bool = False) -> str:
    """Debug view: tokens joined by '|', green where mask=1 (trained on), red where 0."""
    pieces = []
    for token_id, supervised in zip(ids, mask):
        colour = _GREEN if supervised else _RED
        pieces.append(f"{colour}{tokenizer.decode([token_id])}{_RESET}")
        if with_ids:
            pieces.append(f"{_GRAY}({token_id}){_RESET}")
    return "|".join(pieces)
