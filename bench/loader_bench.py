"""Benchmark PackedLoader: packed tokens/s, crop fraction, and resume cost at T=2048, B=32.

Writes parquet shards of documents cut from tiny-shakespeare (the shared reference data, or
--text PATH, or generated words when neither exists) with log-normal lengths, then times
complete batches for several encoders:

- bytes(list)   : `list(text.encode())` per document, the simplest injected encoder
- bytes(numpy)  : `np.frombuffer(text.encode(), uint8)`: the loader accepts arrays too
- pre-tokenized : a dict lookup, so the row is parquet reading + packing only
- bpe-<vocab>   : flaxchat's tokenizer trained with rustbpe on the same text (tiktoken encode)

    uv run python bench/loader_bench.py --batches 40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from flaxchat.data.loader import PackedLoader  # noqa: E402

DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def make_documents(text: str, n_docs: int, median_chars: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median_chars), 1.0, n_docs), 20, len(text) // 2).astype(int)
    starts = rng.integers(0, len(text) - lengths)
    return [text[s:s + n] for s, n in zip(starts, lengths)]


def write_shards(directory: Path, docs: list[str], n_shards: int, rg_size: int) -> list[str]:
    paths = []
    for s, part in enumerate(np.array_split(np.arange(len(docs)), n_shards)):
        path = directory / f"shard_{s:05d}.parquet"
        pq.write_table(pa.table({"text": [docs[i] for i in part]}), path, row_group_size=rg_size)
        paths.append(str(path))
    return paths


def time_loader(make: Callable[..., PackedLoader], batches: int) -> dict[str, float]:
    start = time.perf_counter()
    loader = make(state=None)
    first = time.perf_counter()
    next(loader)  # the first batch fills the buffer: report it separately
    first = time.perf_counter() - first
    start_steady = time.perf_counter()
    for _ in range(batches):
        next(loader)
    steady = time.perf_counter() - start_steady
    t0 = time.perf_counter()
    state = loader.state_dict()
    state_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    resumed = make(state=state)
    next(resumed)
    resume_s = time.perf_counter() - t0
    tokens = batches * loader.local_batch_size * loader.seq_len
    return {"tok_s": tokens / steady, "ms_batch": steady / batches * 1e3, "first_s": first,
            "crop": loader.cropped_fraction, "state_kb": len(json.dumps(state)) / 1024,
            "state_ms": state_ms, "resume_s": resume_s, "total_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--buffer-docs", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=12_000)
    parser.add_argument("--median-chars", type=int, default=1500)
    parser.add_argument("--rg-size", type=int, default=1024)
    parser.add_argument("--bpe-vocab", type=int, default=4096, help="0 skips the BPE row")
    args = parser.parse_args()

    if args.text.exists():
        text, source = args.text.read_text(encoding="utf-8"), str(args.text)
    else:
        words = np.random.default_rng(0).choice(["the", "a", "cat", "sat", "on", "mat", "and", "ran"], 400_000)
        text, source = " ".join(words), "generated words"
    docs = make_documents(text, args.docs, args.median_chars, seed=0)

    encoders: dict[str, tuple[Callable, int]] = {
        "bytes(list)": (lambda texts: [list(t.encode()) for t in texts], 256),
        "bytes(numpy)": (lambda texts: [np.frombuffer(t.encode(), np.uint8) for t in texts], 256),
    }
    cache = {d: np.frombuffer(d.encode(), np.uint8) for d in docs}
    encoders["pre-tokenized"] = (lambda texts: [cache[t] for t in texts], 256)
    if args.bpe_vocab:
        from flaxchat.tokenizer import Tokenizer
        t0 = time.perf_counter()
        tok = Tokenizer.train(text.split("\n\n"), args.bpe_vocab)
        print(f"trained a {tok.vocab_size}-token BPE in {time.perf_counter() - t0:.1f}s")
        encoders[f"bpe-{args.bpe_vocab}"] = (tok.encode, tok.bos_token_id)

    print(f"text: {source}; {len(docs)} docs, {sum(map(len, docs)) / 1e6:.1f} M chars, "
          f"median {args.median_chars} chars; T={args.seq_len} B={args.batch_size} "
          f"buffer={args.buffer_docs} row groups of {args.rg_size}")
    header = (f"{'encoder':<14} {'Mtok/s':>7} {'ms/batch':>9} {'first s':>8} {'cropped':>8} "
              f"{'state KB':>9} {'state ms':>9} {'resume s':>9}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), docs, n_shards=5, rg_size=args.rg_size)
        for name, (encode, bos) in encoders.items():
            def make(state, encode=encode, bos=bos):
                return PackedLoader(shards, encode, bos, args.batch_size, args.seq_len,
                                    buffer_docs=args.buffer_docs, state=state)
            r = time_loader(make, args.batches)
            rows.append(f"{name:<14} {r['tok_s'] / 1e6:>7.2f} {r['ms_batch']:>9.1f} {r['first_s']:>8.2f} "
                        f"{r['crop']:>8.1%} {r['state_kb']:>9.1f} {r['state_ms']:>9.2f} {r['resume_s']:>9.2f}")
            print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)


if __name__ == "__main__":
    main()
