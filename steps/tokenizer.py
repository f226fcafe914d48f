"""Tokenizer stage: train a BPE tokenizer on the pipeline's text and report bytes/token.

Resolves the data source (generating the demo corpus or downloading shards), trains
rustbpe on the train split, measures bytes per token on held-out validation text, and
publishes the tokenizer files + manifest under `output_uri`. The manifest also records
the resolved data shards so later stages read exactly the same data: with a remote artifact root
(gs://…) local shards are first staged under it, content-addressed (flaxchat/data/staging.py), so
the manifest names only URIs that every host, and a resume on another machine, can read. With a
local artifact root the manifest names the local files where they are (one machine, or a cache
on a filesystem every host mounts).

    python -m steps.tokenizer --preset demo --out /tmp/tok
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import Any

from flaxchat import storage
from flaxchat.config import PipelineConfig
from flaxchat.data.sources import iter_documents, resolve_shards
from flaxchat.data.staging import stage_shards
from flaxchat.manifest import build_manifest, write_manifest
from flaxchat.tokenizer import Tokenizer

STAGE = "tokenizer"

# Shown in the card so a reader can eyeball how text is split.
SAMPLE_TEXT = "Once upon a time, Mia found 12 shiny stones. She gave 5 to Leo: 12-5=7 left!"


def _heldout_texts(shards: list[str], max_chars: int) -> list[str]:
    texts, total = [], 0
    for doc in iter_documents(shards, "val"):
        texts.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return texts


def run(config: PipelineConfig, inputs: dict[str, dict[str, Any]], output_uri: str) -> dict[str, Any]:
    tcfg = config.tokenizer
    stage_started = time.time()
    shards = resolve_shards(config.data, config.seed)   # may generate or download the corpus

    started = time.perf_counter()
    train_chars = 0

    def counted(docs):
        nonlocal train_chars
        for doc in docs:
            train_chars += min(len(doc), tcfg.doc_cap)
            yield doc

    docs = iter_documents(shards, "train", max_chars=tcfg.max_chars, doc_cap=tcfg.doc_cap)
    tokenizer = Tokenizer.train(counted(docs), vocab_size=tcfg.vocab_size, doc_cap=tcfg.doc_cap)
    train_seconds = time.perf_counter() - started

    heldout = _heldout_texts(shards, tcfg.eval_chars)
    bytes_per_token = tokenizer.bytes_per_token(heldout)
    sample_ids = tokenizer.encode(SAMPLE_TEXT)

    data = {"source": config.data.source, "shards": list(shards)}
    if storage.is_remote(config.artifact_root):
        staged = stage_shards(shards, config.artifact_root)
        data = {**data, "shards": [e["uri"] for e in staged], "staged": staged}

    with tempfile.TemporaryDirectory(prefix="flaxchat-tok-") as tmp:
        files = tokenizer.save(tmp)
        storage.publish_dir(tmp, output_uri, overwrite=True)

    metrics = {
        "vocab_size": tokenizer.vocab_size,
        "bytes_per_token": bytes_per_token,
        "heldout_chars": sum(len(t) for t in heldout),
        "train_chars": train_chars,
        "train_seconds": train_seconds,
        "train_mb_per_s": train_chars / 1e6 / max(train_seconds, 1e-9),
        "wall_seconds": time.time() - stage_started,
    }
    manifest = build_manifest(
        STAGE, output_uri, metrics, config.to_dict(), files,
        data=data,
        sample={"text": SAMPLE_TEXT, "pieces": [tokenizer.decode([i]) for i in sample_ids]},
    )
    write_manifest(manifest)
    return manifest


if __name__ == "__main__":
    from steps.common import main
    sys.exit(main(STAGE, run))
