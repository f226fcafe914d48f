"""Deterministic, exactly resumable, multi-host packed loader over parquet text shards.

Reads the `text` column of parquet shards (the last shard is validation, the others train),
tokenizes one row group at a time with an injected batch encoder, and packs documents into
(B, T+1) rows with nanochat's BOS-aligned best fit (see packing.py): cropping for pretraining,
padding for SFT. Yields int32 (inputs, targets) of shape (local_batch, T).

Why it is built this way:
- Batch k is a pure function of (seed, k, data, host layout). The reading order comes from
  (seed, epoch) only, and the position is a small JSON state (`state_dict()`): the schedule
  position plus the *identities* (shard, row group, doc) of the buffered documents, never
  their tokens. A loader built from the state after batch k re-reads and re-encodes just
  those documents and yields batch k+1.. bitwise equal to the uninterrupted run.
- Multi-host: each epoch numbers the split's row groups 0, 1, 2.. in reading order across
  shards; process p of P reads those with number % P == p (nanochat's start/step, over the
  whole split so that small shards still spread evenly) and yields its B/P rows.
- Train cycles forever (the epoch is in the state); val ends after one pass, draining its buffer.
- `Prefetcher` builds the next batches on a thread (tokenizers release the GIL) and keeps
  the state of the last batch handed out, so prefetching does not break exact resume.
- Every way to spin forever (no shards, no row groups, an epoch with no documents for this
  host) raises DataError with a one-line fix instead.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.parquet as pq

from flaxchat.data import DataError  # one error type for all data problems; re-exported here
from flaxchat.data.packing import (BufferedDoc, DocBuffer, PackStats, pack_cropped_row,
                                   pack_padded_row, rows_to_pretrain_batch, rows_to_sft_batch)

STATE_VERSION = 1

# encode(texts) -> one entry per text: token ids, or (ids, loss mask) for SFT conversations
Encoded = Sequence[int] | np.ndarray | tuple[Sequence[int], Sequence[int]]
Encode = Callable[[list[str]], Sequence[Encoded]]


def open_parquet(path: str) -> pq.ParquetFile:
    """A local path or any URI of the project's storage layer (gs://, memory://, …), read through
    the same fsspec filesystem objects as every other file, so credentials and emulators agree."""
    from flaxchat import storage
    fs, inner = storage.filesystem(path)
    return pq.ParquetFile(inner, filesystem=fs)


class RowGroupSchedule:
    """The row groups one process reads, in order, and where it is in that order.

    Epoch e reads the shards in order (a (seed, e) permutation when shuffling) and each
    shard's row groups in order (a (seed, e, shard) permutation); `rg_base` is how many row
    groups of the split came before the current shard, so membership (rg_base + j) % P == p
    needs no look-back and resuming never re-reads earlier shards."""

    def __init__(self, shards: list[str], process_index: int, process_count: int, seed: int,
                 shuffle: bool, open_file: Callable[[str], Any]) -> None:
        self.shards, self.p, self.P = shards, process_index, process_count
        self.seed, self.shuffle, self._open = seed, shuffle, open_file
        self.epoch, self.shard_pos, self.rg_pos, self.rg_base = 1, 0, 0, 0
        self._counts: dict[int, int] = {}
        self._file: tuple[int, Any] | None = None
        self._shard_order: tuple[int, list[int]] | None = None
        self._rg_order: tuple[tuple[int, int], Any] | None = None

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "rg_pos": self.rg_pos,
                "rg_base": self.rg_base}

    def set_position(self, pos: dict[str, int]) -> None:
        self.epoch, self.shard_pos = int(pos["epoch"]), int(pos["shard_pos"])
        self.rg_pos, self.rg_base = int(pos["rg_pos"]), int(pos["rg_base"])

    def shard_order(self, epoch: int) -> list[int]:
        if self._shard_order is None or self._shard_order[0] != epoch:
            order = list(range(len(self.shards)))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
            self._shard_order = (epoch, order)
        return self._shard_order[1]

    def rg_order(self, epoch: int, shard: int) -> Any:
        if self._rg_order is None or self._rg_order[0] != (epoch, shard):
            n = self.num_row_groups(shard)
            order: Any = range(n)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, shard, 1]).permutation(n).tolist()
            self._rg_order = ((epoch, shard), order)
        return self._rg_order[1]

    def parquet(self, shard: int) -> Any:
        if self._file is None or self._file[0] != shard:
            try:
                self._file = (shard, self._open(self.shards[shard]))
            except (OSError, ValueError) as exc:  # pyarrow's errors subclass these
                raise DataError(f"cannot open shard {self.shards[shard]!r}: {exc}") from exc
        return self._file[1]

    def num_row_groups(self, shard: int) -> int:
        if shard not in self._counts:
            n = self.parquet(shard).num_row_groups
            if n == 0:
                raise DataError(f"shard {self.shards[shard]!r} has no row groups; "
                                "rewrite it or drop it from the shard list")
            self._counts[shard] = n
        return self._counts[shard]

    def next(self) -> tuple[int, int] | None:
        """The next (shard, row group) of this process, or None at the end of the epoch."""
        order = self.shard_order(self.epoch)
        while self.shard_pos < len(order):
            shard = order[self.shard_pos]
            n = self.num_row_groups(shard)
            # first j >= rg_pos whose split-wide number belongs to this process
            j = self.rg_pos + (self.p - (self.rg_base + self.rg_pos)) % self.P
            if j < n:
                self.rg_pos = j + 1
                return shard, int(self.rg_order(self.epoch, shard)[j])
            self.shard_pos, self.rg_pos, self.rg_base = self.shard_pos + 1, 0, self.rg_base + n
        return None

    def start_next_epoch(self) -> None:
        self.epoch, self.shard_pos, self.rg_pos, self.rg_base = self.epoch + 1, 0, 0, 0

    def read_texts(self, shard: int, rg: int, column: str) -> list[str]:
        pf = self.parquet(shard)
        if column not in pf.schema_arrow.names:
            raise DataError(f"shard {self.shards[shard]!r} has no column {column!r} "
                            f"(columns: {pf.schema_arrow.names}); pass text_column=")
        if not 0 <= rg < pf.num_row_groups:
            raise DataError(f"shard {self.shards[shard]!r} has no row group {rg}; "
                            "the loader state does not match this data")
        values = pf.read_row_group(rg, columns=[column]).column(0).to_pylist()
        return ["" if v is None else v for v in values]  # a null document packs as a lone BOS


class PackedLoader:
    """Iterator of packed (inputs, targets) int32 batches of shape (batch_size // P, seq_len).

    `batch_size` is the global number of rows per step; process `process_index` of
    `process_count` yields its own batch_size // process_count rows. `mode="pretrain"` crops,
    `mode="sft"` pads (targets -1 on padding and where the encoder's loss mask is 0;
    a conversation longer than seq_len + 1 is truncated). The loader prepends BOS to each
    document unless the encoder already did. A pretraining document longer than a row is
    cropped like any other (nanochat's behaviour), so it cannot stall the packer.
    """

    def __init__(self, shards: Sequence[str], encode: Encode, bos_id: int, batch_size: int,
                 seq_len: int, split: str = "train", mode: str = "pretrain",
                 buffer_docs: int = 1000, process_index: int = 0, process_count: int = 1,
                 seed: int = 0, shuffle: bool = True, state: dict | None = None,
                 text_column: str = "text",
                 open_file: Callable[[str], Any] = open_parquet) -> None:
        shards = [str(s) for s in shards]
        _check_settings(shards, split, mode, batch_size, seq_len, buffer_docs,
                        process_index, process_count, seed)
        self.split, self.mode, self.seq_len = split, mode, seq_len
        self.batch_size, self.local_batch_size = batch_size, batch_size // process_count
        self.buffer_docs, self.bos_id, self.text_column = buffer_docs, int(bos_id), text_column
        self._encode = encode
        split_shards = shards[:-1] if split == "train" else shards[-1:]
        self._layout = {"version": STATE_VERSION, "split": split, "mode": mode,
                        "seq_len": seq_len, "buffer_docs": buffer_docs, "seed": seed,
                        "shuffle": shuffle and split == "train", "num_shards": len(split_shards),
                        "process_index": process_index, "process_count": process_count}
        # validation is read in file order so every run evaluates the same documents
        self._schedule = RowGroupSchedule(split_shards, process_index, process_count, seed,
                                          self._layout["shuffle"], open_file)
        self._buffer = DocBuffer()
        self.stats = PackStats()
        self._epoch_docs = 0      # documents this process read in the current epoch
        self._batches = 0
        self._exhausted = False   # val only: the single pass is over
        if state is not None:
            self._load_state(state)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.empty((self.local_batch_size, self.seq_len + 1), dtype=np.int32)
        if self.mode == "pretrain":
            for row in rows:
                if not pack_cropped_row(self._buffer, row, self._ensure, self.stats):
                    raise StopIteration
            batch = rows_to_pretrain_batch(rows)
        else:
            masks = np.empty(rows.shape, dtype=np.int8)
            for row, mask in zip(rows, masks):
                if pack_padded_row(self._buffer, row, mask, self._ensure, self.stats,
                                   self.bos_id) is None:
                    raise StopIteration
            batch = rows_to_sft_batch(rows, masks)
        self._batches += 1
        return batch

    @property
    def epoch(self) -> int:
        return self._schedule.epoch

    @property
    def batches_yielded(self) -> int:
        return self._batches

    @property
    def cropped_fraction(self) -> float:
        """Tokens dropped by cropping / tokens of the documents packed so far (≈0.35 at T=2048)."""
        return self.stats.cropped_fraction

    def row_group_plan(self, epoch: int = 1) -> list[tuple[int, int]]:
        """(split shard index, row group) this process reads in `epoch`, in reading order."""
        s = self._schedule
        plan = RowGroupSchedule(s.shards, s.p, s.P, s.seed, s.shuffle, s._open)
        plan.epoch = epoch
        out = []
        while (where := plan.next()) is not None:
            out.append(where)
        return out

    # --------------------------------------------------------------------- reading
    def _ensure(self) -> bool:
        """Top the buffer up to `buffer_docs` (whole row groups); False once it is empty for good."""
        while len(self._buffer) < self.buffer_docs and not self._exhausted:
            where = self._schedule.next()
            if where is not None:
                self._read_row_group(*where)
                continue
            if self._epoch_docs == 0:
                s = self._schedule
                raise DataError(
                    f"process {s.p} of {s.P} got no documents from the {self.split} split "
                    f"({len(s.shards)} shard(s)): it has fewer row groups than processes or "
                    "only empty ones; use more, smaller row groups or fewer processes")
            if self.split == "val":
                self._exhausted = True
            else:
                self._schedule.start_next_epoch()
                self._epoch_docs = 0
        return len(self._buffer) > 0

    def _read_row_group(self, shard: int, rg: int, doc_indices: list[int] | None = None) -> None:
        texts = self._schedule.read_texts(shard, rg, self.text_column)
        fresh = doc_indices is None
        if fresh:
            doc_indices = list(range(len(texts)))
        elif doc_indices and not (0 <= min(doc_indices) and max(doc_indices) < len(texts)):
            raise DataError(f"loader state names documents past the end of row group {rg} of "
                            f"shard {self._schedule.shards[shard]!r}; it was saved for other data")
        if not doc_indices:
            return
        encoded = self._encode([texts[i] for i in doc_indices])  # one encode call per row group
        if len(encoded) != len(doc_indices):
            raise DataError(f"encode returned {len(encoded)} token lists for "
                            f"{len(doc_indices)} texts; it must return one per text")
        for i, item in zip(doc_indices, encoded):
            self._buffer.add(self._to_doc(item, (shard, rg, i), fresh))
        if fresh:
            self._epoch_docs += len(doc_indices)

    def _to_doc(self, item: Encoded, ident: tuple[int, int, int], fresh: bool) -> BufferedDoc:
        mask_in = None
        if isinstance(item, tuple):
            item, mask_in = item
        ids = np.asarray(item, dtype=np.int32).reshape(-1)
        prepend = ids.size == 0 or ids[0] != self.bos_id
        tokens = np.empty(ids.size + prepend, dtype=np.int32)
        tokens[0] = self.bos_id
        tokens[int(prepend):] = ids
        if self.mode == "pretrain":
            return BufferedDoc(tokens, None, ident)
        mask = np.ones(tokens.size, dtype=np.int8)
        if mask_in is not None:
            mask_in = np.asarray(mask_in, dtype=np.int8).reshape(-1)
            if mask_in.size != ids.size:
                raise DataError(f"encode returned a loss mask of {mask_in.size} for {ids.size} "
                                "tokens; (ids, mask) must have equal lengths")
            mask[int(prepend):] = mask_in
        if prepend:
            mask[0] = 0  # the BOS we added is never a target, as in render_conversation
        capacity = self.seq_len + 1
        if tokens.size > capacity:  # an SFT row is never cropped, so truncate to fit one
            if fresh:
                self.stats.truncated_tokens += tokens.size - capacity
            tokens, mask = tokens[:capacity], mask[:capacity]
        return BufferedDoc(tokens, mask, ident)

    # ----------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """JSON-serialisable position after the last yielded batch; pass as `state=` to resume."""
        groups: list[list[Any]] = []
        for shard, rg, doc in self._buffer.identities():
            if groups and groups[-1][0] == shard and groups[-1][1] == rg:
                groups[-1][2].append(doc)
            else:
                groups.append([shard, rg, [doc]])
        return {**self._layout, **self._schedule.position(), "epoch_docs": self._epoch_docs,
                "batches": self._batches, "buffer": groups, "stats": self.stats.to_dict()}

    def _load_state(self, state: dict) -> None:
        mismatched = [f"{k}={state.get(k)!r} (loader has {v!r})"
                      for k, v in self._layout.items() if state.get(k) != v]
        if mismatched:
            raise DataError("loader state was saved with different settings: "
                            + ", ".join(mismatched) + "; build the loader with the saved settings")
        self._schedule.set_position(state)
        self._epoch_docs, self._batches = int(state["epoch_docs"]), int(state["batches"])
        self.stats = PackStats(**state["stats"])
        for shard, rg, docs in state["buffer"]:
            if not 0 <= shard < len(self._schedule.shards):
                raise DataError(f"loader state names shard {shard} of {len(self._schedule.shards)}")
            self._read_row_group(int(shard), int(rg), [int(d) for d in docs])


class Prefetcher:
    """Builds the next `depth` batches of a loader on a background thread.

    Tokenizers (tiktoken, rustbpe) release the GIL, so encoding overlaps the training step.
    `state_dict()` is the state after the last batch *handed out*, not the last one built, so
    resuming stays exact. Errors from the loader are re-raised by `next()`."""

    _END = object()

    def __init__(self, loader: PackedLoader, depth: int = 2) -> None:
        if depth < 1:
            raise DataError(f"prefetch depth must be >= 1, got {depth}")
        self.loader = loader
        self._state = loader.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, name="flaxchat-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for batch in self.loader:
                if not self._put((batch, self.loader.state_dict())):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        return self._state

    def close(self) -> None:
        """Stop the worker thread (it finishes the batch it is building)."""
        self._stop.set()
        self._thread.join()


def _check_settings(shards: list[str], split: str, mode: str, batch_size: int, seq_len: int,
                    buffer_docs: int, process_index: int, process_count: int, seed: int) -> None:
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if mode not in ("pretrain", "sft"):
        raise DataError(f"mode must be 'pretrain' or 'sft', got {mode!r}")
    if not shards:
        raise DataError("no parquet shards given; prepare the dataset first")
    if split == "train" and len(shards) < 2:
        raise DataError(f"the train split is empty: the last of the {len(shards)} shard(s) is "
                        "validation; give at least 2 shards")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"batch_size {batch_size} must be a positive multiple of "
                        f"process_count {process_count} (it is the global number of rows)")
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if buffer_docs < 1:
        raise DataError(f"buffer_docs must be >= 1, got {buffer_docs}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
