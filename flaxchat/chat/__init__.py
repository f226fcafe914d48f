"""Chat front ends (CLI in steps/chat.py, web app in flaxchat.chat.server) and what they share.

Both front ends turn a stream of token ids into text as it arrives. A BPE token can end in the
middle of a multi-byte UTF-8 character (the byte-level vocabulary splits "é" or an emoji across
tokens), so decoding token by token would print U+FFFD garbage. `TextStreamer` keeps the ids of
the current reply and releases text only while the decoded reply does not end in U+FFFD; the held
back bytes come out with the token that completes the character.

Importing this package is cheap (no jax, no fastapi): the server and loader are separate modules.
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


class TokenDecoder(Protocol):
    """The part of flaxchat.tokenizer.Tokenizer that streaming needs."""

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_special(self, name: str) -> int: ...


def stop_token_ids(tokenizer: TokenDecoder) -> frozenset[int]:
    """Ids that end an assistant turn: <|assistant_end|> (and <|bos|>, which starts a new document)."""
    return frozenset(tokenizer.encode_special(name) for name in STOP_TOKENS)


class TextStreamer:
    """Token ids in, UTF-8-safe text deltas out.

    `push(id)` returns the newly complete text (possibly ""); `flush()` returns whatever is still
    held back at the end of the reply (an incomplete character stays a U+FFFD, as decode gives).
    Only the ids since the last clean point are decoded: a decode that does not end in U+FFFD ends
    on a character boundary, so the concatenated deltas equal `decode(all ids)` at O(n) cost.
    """

    def __init__(self, tokenizer: TokenDecoder):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._pending: list[int] = []   # ids whose text has not been handed out yet

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        self._pending.append(int(token_id))
        text = self._tokenizer.decode(self._pending)
        if text.endswith(REPLACEMENT):
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        text = self._tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        return text


__all__ = ["REPLACEMENT", "STOP_TOKENS", "TextStreamer", "TokenDecoder", "stop_token_ids"]
