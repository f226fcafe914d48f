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
    Decoding the whole reply each time (instead of per token) is what makes multi-token
    characters come out right; the text emitted so far is always a prefix of the full decode.
    """

    def __init__(self, tokenizer: TokenDecoder):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0          # characters of the reply already handed out

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tokenizer.decode(self._ids)
        if text.endswith(REPLACEMENT):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._tokenizer.decode(self._ids)) if self._ids else ""

    def _take(self, text: str) -> str:
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta


__all__ = ["REPLACEMENT", "STOP_TOKENS", "TextStreamer", "TokenDecoder", "stop_token_ids"]
