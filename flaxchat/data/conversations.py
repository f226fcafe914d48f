"""Conversations as packed-loader input: a task mixture written to parquet, and its encoder.

SFT reuses the pretraining loader (`PackedLoader(mode="sft")`: best-fit packing with padding,
exact resume, multi-host sharding) instead of a second loader. For that the mixture is written
once, in mixture order, as parquet shards whose `text` column holds one JSON conversation per
row (the last shard is the validation split, the loader's convention), and the encoder renders
each JSON row into (ids, loss mask) with nanochat's chat format. The files are a pure function
of the mixture (its seed and sizes), so a resumed stage rewrites identical files and the
loader's saved position still points at the same conversations.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Sequence

from flaxchat.chat_format import render_conversation

ROWS_PER_GROUP = 256


class _Examples:
    """Anything with len() and example(i) (a Task or TaskMixture)."""

    def __len__(self) -> int: ...

    def example(self, i: int) -> dict[str, Any]: ...


def _write(examples: _Examples, path: str, rows_per_group: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [json.dumps(examples.example(i), ensure_ascii=False) for i in range(len(examples))]
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=rows_per_group)
    os.replace(tmp, path)
    return len(texts)


def write_conversation_shards(train: _Examples, val: _Examples, out_dir: str,
                              rows_per_group: int = ROWS_PER_GROUP) -> list[str]:
    """[train shard, val shard] under out_dir; raises ValueError when either split is empty."""
    for name, split in (("training", train), ("validation", val)):
        if len(split) == 0:
            raise ValueError(f"the SFT {name} mixture is empty; check the tasks section of the config")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "train_00000.parquet"), os.path.join(out_dir, "val_00000.parquet")]
    _write(train, paths[0], rows_per_group)
    _write(val, paths[1], rows_per_group)
    return paths


def conversation_encoder(tokenizer) -> Callable[[list[str]], list[tuple[list[int], list[int]]]]:
    """texts (JSON conversations) -> [(ids, mask)], whole: the loader truncates a conversation
    longer than a row and counts what it cut (`PackStats.truncated_tokens`)."""
    def encode(texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        return [render_conversation(tokenizer, json.loads(t), max_tokens=sys.maxsize) for t in texts]
    return encode


def count_tokens(examples: _Examples, tokenizer, max_tokens: int) -> int:
    """Tokens the rendered (and truncated) conversations hold: what one epoch has to pack."""
    return sum(len(render_conversation(tokenizer, examples.example(i), max_tokens=max_tokens)[0])
               for i in range(len(examples)))
