"""nanochat's BPE tokenizer: trained with rustbpe, run with tiktoken, saved in a portable format.

Training uses `rustbpe` (fast parallel BPE training) with nanochat's GPT-4-style split pattern;
inference uses a `tiktoken.Encoding` built from the learnt mergeable ranks, because tiktoken's
encoder is the fastest available and its batch encoder releases the GIL. The vocabulary is
[256 byte tokens][merges][9 special tokens], so `vocab_size` counts all three (nanochat's
convention) and the specials always hold the last 9 ids.

On disk a tokenizer is two files (no pickle, so a file can be read by any language and cannot run
code when loaded):
  tokenizer.tiktoken  one line per token, ``base64(token bytes) rank``, in rank order; the same
                      format `tiktoken.load.load_tiktoken_bpe` reads.
  tokenizer.json      format version, split pattern, special tokens and their ids, vocab_size and
                      the sha256 of the rank file.
Both are written atomically and `load` refuses anything inconsistent with `TokenizerFormatError`,
because a silently different tokenizer would corrupt every later stage without an error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

from flaxchat import chat_format, storage
from flaxchat.tokenizer_specials import SPECIAL_TOKENS, SPLIT_PATTERN

FORMAT_NAME = "flaxchat-bpe"
FORMAT_VERSION = 1
RANK_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
_RESAVE_HINT = "re-run tokenizer training (Tokenizer.train(...).save(dir)) to rebuild it"


class TokenizerFormatError(ValueError):
    """A saved tokenizer is missing, corrupted or inconsistent; the message names the file and fix."""


class Tokenizer:
    """Byte-level BPE tokenizer with nanochat's special tokens and chat rendering."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        _check_ranks(mergeable_ranks)
        self._ranks = dict(mergeable_ranks)
        self.pattern = pattern
        offset = len(self._ranks)
        self._special_ids = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            name="flaxchat",
            pat_str=pattern,
            mergeable_ranks=self._ranks,
            special_tokens=self._special_ids,
            explicit_n_vocab=offset + len(SPECIAL_TOKENS),
        )
        self.vocab_size: int = self._enc.n_vocab
        self.bos_token_id: int = self._special_ids["<|bos|>"]
        self._token_bytes: np.ndarray | None = None

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, doc_cap: int = 10_000) -> Tokenizer:
        """Learn `vocab_size - 256 - 9` merges from `texts`, each document cropped to `doc_cap` chars."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        if doc_cap < 1:
            raise ValueError(f"doc_cap={doc_cap} must be >= 1 (characters kept per document)")
        n_ranks = vocab_size - len(SPECIAL_TOKENS)

        def cropped() -> Iterator[str]:
            for doc in texts:
                yield doc[:doc_cap]

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(cropped(), n_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(ranks) != n_ranks:
            # rustbpe stops early when no pair occurs twice; a smaller vocab would disagree with
            # the config every later stage was sized from, so fail here instead.
            raise ValueError(
                f"the training text only supports {len(ranks) - 256} merges but vocab_size={vocab_size} "
                f"needs {n_ranks - 256}: give the tokenizer more text or lower vocab_size to at most "
                f"{len(ranks) + len(SPECIAL_TOKENS)}")
        return cls(ranks, trainer.get_pattern())

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write the rank file then the metadata (each atomically); return {filename: sha256}."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rank_bytes = b"".join(
            base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
            for token, rank in sorted(self._ranks.items(), key=lambda item: item[1]))
        rank_sha = hashlib.sha256(rank_bytes).hexdigest()
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "num_ranks": len(self._ranks),
            "pattern": self.pattern,
            "special_tokens": self._special_ids,
            "rank_file": RANK_FILE,
            "rank_file_sha256": rank_sha,
        }
        meta_bytes = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        # Rank file first: tokenizer.json is the commit point, so a crash in between leaves a
        # checksum mismatch that load() reports, never a silently mixed pair.
        storage.write_bytes(directory / RANK_FILE, rank_bytes)
        storage.write_bytes(directory / META_FILE, meta_bytes)
        return {RANK_FILE: rank_sha, META_FILE: hashlib.sha256(meta_bytes).hexdigest()}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by `save`, verifying every field; raises TokenizerFormatError."""
        directory = Path(directory)
        meta_path, rank_path = directory / META_FILE, directory / RANK_FILE
        meta = _read_meta(meta_path)
        rank_bytes = _read_file(rank_path)
        actual_sha = hashlib.sha256(rank_bytes).hexdigest()
        if actual_sha != meta["rank_file_sha256"]:
            raise TokenizerFormatError(
                f"{rank_path}: sha256 {actual_sha[:12]}… does not match {meta['rank_file_sha256'][:12]}… "
                f"recorded in {META_FILE}; the file is corrupted, truncated or from another save: {_RESAVE_HINT}")
        ranks = _parse_ranks(rank_path, rank_bytes)
        if len(ranks) != meta["num_ranks"] or meta["vocab_size"] != len(ranks) + len(SPECIAL_TOKENS):
            raise TokenizerFormatError(
                f"{meta_path}: vocab_size={meta['vocab_size']} / num_ranks={meta['num_ranks']} disagree with "
                f"the {len(ranks)} tokens in {RANK_FILE} + {len(SPECIAL_TOKENS)} specials: {_RESAVE_HINT}")
        expected_specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if meta["special_tokens"] != expected_specials:
            raise TokenizerFormatError(
                f"{meta_path}: special tokens {meta['special_tokens']} differ from flaxchat's "
                f"{expected_specials}: {_RESAVE_HINT}")
        try:
            return cls(ranks, meta["pattern"])
        except ValueError as err:  # e.g. an invalid regex in an edited pattern
            raise TokenizerFormatError(f"{meta_path}: {err}: {_RESAVE_HINT}") from err

    # ---------------------------------------------------------------- queries
    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name -> id, in nanochat's order."""
        return dict(self._special_ids)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """Token bytes -> rank (= id) for every non-special token (a copy)."""
        return dict(self._ranks)

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {list(self._special_ids)}") from None

    def decode_token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (special tokens give their UTF-8 name)."""
        return self._enc.decode_single_token_bytes(int(token_id))

    def token_bytes(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 byte length of each token, 0 for specials (for bits per byte)."""
        if self._token_bytes is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int32)
            for token, rank in self._ranks.items():
                lengths[rank] = len(token)
            self._token_bytes = lengths
        return self._token_bytes.copy()

    # ------------------------------------------------------- encode / decode
    def encode(self, text: str | list[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode ordinary text (special-token strings inside `text` stay plain text).

        A list is encoded by tiktoken's Rust encoder on up to `num_threads` threads (never more
        than the usable CPUs); `prepend`/`append` add one token (an id or a special token name) to
        each sequence.
        """
        head = [] if prepend is None else [self._token_id(prepend)]
        tail = [] if append is None else [self._token_id(append)]
        if isinstance(text, str):
            return head + self._enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            rows = self._encode_batch(text, num_threads)
            if head or tail:
                rows = [head + row + tail for row in rows]
            return rows
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # tiktoken's encode_ordinary_batch submits one future per text, which made encoding
        # 4-11x slower than a plain loop on short documents; contiguous chunks keep the
        # parallelism (the Rust encoder releases the GIL) without the per-text overhead.
        threads = min(num_threads, _usable_cpus(), len(texts))
        if threads <= 1 or sum(map(len, texts)) < _MIN_PARALLEL_CHARS:
            return [self._enc.encode_ordinary(t) for t in texts]
        n_chunks = min(threads * 4, len(texts))  # several per thread balance uneven lengths
        size = -(-len(texts) // n_chunks)
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        encode = self._enc.encode_ordinary
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda chunk: [encode(t) for t in chunk], chunks)
            return [row for part in parts for row in part]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids -> text; invalid UTF-8 (a token cut mid-character) becomes U+FFFD."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self._enc.decode(list(ids))

    def bytes_per_token(self, texts: list[str]) -> float:
        """Compression on held-out text: total UTF-8 bytes / total tokens."""
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(row) for row in self._encode_batch(texts, num_threads=8))
        if n_tokens == 0:
            raise ValueError("bytes_per_token needs non-empty text (got 0 tokens)")
        return n_bytes / n_tokens

    # ------------------------------------------------------------------- chat
    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a chat; mask=1 on tokens the assistant is trained on. See chat_format."""
        return chat_format.render_conversation(self, conversation, max_tokens)

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids ending in <|assistant_start|>, the last assistant message dropped."""
        return chat_format.render_for_completion(self, conversation)

    def _token_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        token = int(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return token

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._ranks) - 256})"


# ------------------------------------------------------------------ helpers
_MIN_PARALLEL_CHARS = 1 << 16  # below this, starting threads costs more than it saves


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_ranks(ranks: dict[bytes, int]) -> None:
    """Ranks must be ids 0..n-1 with the 256 single bytes first, as byte-level BPE needs."""
    if len(ranks) < 256:
        raise ValueError(f"mergeable ranks hold {len(ranks)} tokens; byte-level BPE needs at least 256")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("mergeable ranks must be exactly the ids 0..n-1, each used once")
    if any(ranks.get(bytes([b])) != b for b in range(256)):
        raise ValueError("mergeable ranks must map each single byte b to rank b")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TokenizerFormatError(f"{path}: file is missing: {_RESAVE_HINT}") from None


def _read_meta(path: Path) -> dict:
    raw = _read_file(path)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFormatError(f"{path}: not valid JSON ({err}); it is corrupted or truncated: "
                                   f"{_RESAVE_HINT}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TokenizerFormatError(f"{path}: not a {FORMAT_NAME} tokenizer file: {_RESAVE_HINT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TokenizerFormatError(
            f"{path}: format_version={meta.get('format_version')!r} but this flaxchat reads version "
            f"{FORMAT_VERSION}: {_RESAVE_HINT}")
    fields = {"vocab_size": int, "num_ranks": int, "pattern": str, "special_tokens": dict,
              "rank_file_sha256": str}
    for name, kind in fields.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise TokenizerFormatError(f"{path}: field {name!r} is missing or not a {kind.__name__}: {_RESAVE_HINT}")
    if meta.get("rank_file") != RANK_FILE:
        raise TokenizerFormatError(f"{path}: rank_file={meta.get('rank_file')!r}, expected {RANK_FILE!r}: {_RESAVE_HINT}")
    return meta


def _parse_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    """Parse ``base64 rank`` lines; rank must equal the line number (the file is in rank order)."""
    ranks: dict[bytes, int] = {}
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line_no, line in enumerate(lines):
        try:
            encoded, rank_text = line.split(b" ")
            token, rank = base64.b64decode(encoded, validate=True), int(rank_text)
        except (ValueError, binascii.Error):
            raise TokenizerFormatError(
                f"{path}: line {line_no + 1} is not 'base64 rank': {_RESAVE_HINT}") from None
        if rank != line_no or token in ranks:
            raise TokenizerFormatError(
                f"{path}: line {line_no + 1} has rank {rank} (expected {line_no}, unique tokens): {_RESAVE_HINT}")
        ranks[token] = rank
    try:
        _check_ranks(ranks)
    except ValueError as err:
        raise TokenizerFormatError(f"{path}: {err}: {_RESAVE_HINT}") from None
    return ranks
