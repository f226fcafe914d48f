"""BOS-aligned best-fit packing of tokenized documents into fixed-length rows (pure, no I/O).

nanochat packs pretraining rows so that every row starts with BOS and every token can attend
back to the start of its own document: each row takes the largest buffered document that still
fits, and when none fits the shortest buffered document is cropped to fill the row exactly
(the rest of it is dropped; ≈35% of tokens at T=2048). SFT packs the same way but pads the
row (BOS inputs, -1 targets) instead of cropping, so no conversation token is ever lost.

nanochat scans a Python list for every pick; here the buffer is kept sorted by
(length, arrival), so a pick is a bisect. Ties go to the document that arrived first, which is
what nanochat's first-match scan does, so both orders agree.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import numpy as np

# a buffer key packs (length, arrival) into one int: ints compare much faster than tuples
_SEQ_BITS = 40
_SEQ_MASK = (1 << _SEQ_BITS) - 1


class BufferedDoc(NamedTuple):
    tokens: np.ndarray            # int32, BOS first
    mask: np.ndarray | None       # int8 loss mask aligned with tokens (SFT only)
    ident: tuple[int, int, int]   # (shard, row group, document index) for exact resume


@dataclass
class PackStats:
    """Running token accounting; `cropped_fraction` is nanochat's "tokens lost to cropping"."""
    docs: int = 0            # documents taken out of the buffer
    doc_tokens: int = 0      # their tokens (BOS included), before cropping
    cropped_tokens: int = 0  # tokens dropped by cropping (pretrain)
    pad_tokens: int = 0      # padding positions (sft)
    truncated_tokens: int = 0  # tokens cut from SFT conversations longer than a row, at read time

    @property
    def cropped_fraction(self) -> float:
        return self.cropped_tokens / self.doc_tokens if self.doc_tokens else 0.0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class DocBuffer:
    """Documents waiting to be packed, ordered by (length, arrival order)."""

    def __init__(self) -> None:
        self._keys: list[int] = []                  # sorted (length << 40 | seq)
        self._docs: dict[int, BufferedDoc] = {}     # seq -> doc; dicts keep arrival order
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, doc: BufferedDoc) -> None:
        seq = self._next_seq
        self._next_seq += 1
        bisect.insort(self._keys, (len(doc.tokens) << _SEQ_BITS) | seq)
        self._docs[seq] = doc

    def pop_largest_fitting(self, space: int) -> BufferedDoc | None:
        """The longest document of length <= space (earliest arrival among equals), or None."""
        i = bisect.bisect_right(self._keys, (space << _SEQ_BITS) | _SEQ_MASK) - 1
        if i < 0:
            return None
        length = self._keys[i] >> _SEQ_BITS
        i = bisect.bisect_left(self._keys, length << _SEQ_BITS)  # first arrival of that length
        return self._pop(i)

    def pop_shortest(self) -> BufferedDoc:
        return self._pop(0)

    def _pop(self, i: int) -> BufferedDoc:
        key = self._keys.pop(i)
        return self._docs.pop(key & _SEQ_MASK)

    def identities(self) -> list[tuple[int, int, int]]:
        """(shard, row group, doc) of every buffered document, in arrival order."""
        return [doc.ident for doc in self._docs.values()]


# `ensure()` tops the buffer up and says whether it holds anything; False = data ran out
Ensure = Callable[[], bool]


def pack_cropped_row(buffer: DocBuffer, row: np.ndarray, ensure: Ensure, stats: PackStats) -> bool:
    """Fill `row` completely (pretrain). False if the data ran out before the row was full."""
    capacity = row.shape[0]
    pos = 0
    while pos < capacity:
        if not ensure():
            return False
        space = capacity - pos
        doc = buffer.pop_largest_fitting(space)
        stats.docs += 1
        if doc is None:
            doc = buffer.pop_shortest()
            n = len(doc.tokens)
            row[pos:] = doc.tokens[:space]
            stats.doc_tokens += n
            stats.cropped_tokens += n - space
            return True
        n = len(doc.tokens)
        row[pos:pos + n] = doc.tokens
        stats.doc_tokens += n
        pos += n
    return True


def pack_padded_row(buffer: DocBuffer, row: np.ndarray, mask_row: np.ndarray, ensure: Ensure,
                    stats: PackStats, pad_id: int) -> int | None:
    """Fill `row` with whole documents, then pad (SFT). Returns the content length, or None if the
    data ran out before the row got any content. Documents must already fit in a row."""
    capacity = row.shape[0]
    pos = 0
    while pos < capacity:
        if not ensure():
            if pos == 0:
                return None
            break  # the last rows of a finite split keep what they got
        doc = buffer.pop_largest_fitting(capacity - pos)
        if doc is None:
            break
        n = len(doc.tokens)
        row[pos:pos + n] = doc.tokens
        mask_row[pos:pos + n] = doc.mask
        stats.docs += 1
        stats.doc_tokens += n
        pos += n
    row[pos:] = pad_id
    mask_row[pos:] = 0
    stats.pad_tokens += capacity - pos
    return pos


def rows_to_pretrain_batch(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, T+1) packed rows -> contiguous int32 (inputs, targets), targets shifted by one."""
    # explicit copies: with one row the slices count as contiguous and ascontiguousarray would
    # return views sharing memory, so masking targets would corrupt inputs
    return rows[:, :-1].copy(), rows[:, 1:].copy()


def rows_to_sft_batch(rows: np.ndarray, mask_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like rows_to_pretrain_batch, with targets -1 wherever the target token's mask is 0.

    Padding carries mask 0, so padding targets, and the target at the last content position
    (which would predict the first pad), are -1, as in nanochat."""
    inputs, targets = rows_to_pretrain_batch(rows)
    targets[mask_rows[:, 1:] == 0] = -1
    return inputs, targets
