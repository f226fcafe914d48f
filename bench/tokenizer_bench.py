"""Benchmark the flaxchat tokenizer: training and encoding throughput, and compression.

Trains on tiny-shakespeare (from the shared reference data, or --text PATH) split into documents
at blank lines, the first 90% for training and the last 10% held out for bytes/token. Prints a
table of medians over --repeats runs:

    uv run python bench/tokenizer_bench.py --vocab-size 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from flaxchat.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text file to train on")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=8, help="threads for batch encode")
    args = parser.parse_args()
    if not args.text.is_file():
        sys.exit(f"text file not found: {args.text}; pass --text PATH to a UTF-8 text file "
                 f"(the default lives in ../shared/data/tinyshakespeare/input.txt)")

    text = args.text.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()]
    n_train = int(len(docs) * 0.9)
    train_docs, held_out = docs[:n_train], docs[n_train:]
    lines = text.splitlines(keepends=True)
    mb = lambda items: sum(len(s.encode("utf-8")) for s in items) / 1e6  # noqa: E731
    train_mb, text_mb = mb(train_docs), mb([text])

    train_s, tok = median_seconds(lambda: Tokenizer.train(train_docs, args.vocab_size), args.repeats)
    docs_s, _ = median_seconds(lambda: tok.encode(docs, num_threads=args.num_threads), args.repeats)
    tiktoken_s, _ = median_seconds(lambda: tok._enc.encode_ordinary_batch(docs, num_threads=args.num_threads),
                                   args.repeats)
    lines_s, _ = median_seconds(lambda: tok.encode(lines, num_threads=args.num_threads), args.repeats)
    single_s, ids = median_seconds(lambda: tok.encode(text), args.repeats)
    decode_s, decoded = median_seconds(lambda: tok.decode(ids), args.repeats)
    assert decoded == text, "round trip failed"
    with tempfile.TemporaryDirectory() as tmp:
        save_s, _ = median_seconds(lambda: tok.save(tmp), args.repeats)
        load_s, loaded = median_seconds(lambda: Tokenizer.load(tmp), args.repeats)
    assert loaded.encode(held_out) == tok.encode(held_out), "save/load changed encodings"

    versions = {p: importlib.metadata.version(p) for p in ("rustbpe", "tiktoken")}
    print(f"text: {args.text} ({text_mb:.2f} MB, {len(docs)} docs, {len(lines)} lines); "
          f"vocab_size={tok.vocab_size}; cpus={os.cpu_count()}; num_threads={args.num_threads}; "
          f"repeats={args.repeats} (medians); {versions}")
    rows = [
        ("train (rustbpe)", f"{train_mb / train_s:8.2f} MB/s", f"{train_s:7.3f} s on {train_mb:.2f} MB"),
        ("encode batch (docs)", f"{text_mb / docs_s:8.2f} MB/s", f"{docs_s:7.3f} s, {len(docs)} docs"),
        ("  tiktoken's own batch", f"{text_mb / tiktoken_s:8.2f} MB/s",
         f"{tiktoken_s:7.3f} s, encode_ordinary_batch on the same docs (for reference)"),
        ("encode batch (lines)", f"{text_mb / lines_s:8.2f} MB/s", f"{lines_s:7.3f} s, {len(lines)} lines"),
        ("encode single string", f"{text_mb / single_s:8.2f} MB/s", f"{single_s:7.3f} s, {len(ids)} tokens"),
        ("decode single", f"{text_mb / decode_s:8.2f} MB/s", f"{decode_s:7.3f} s"),
        ("save / load", f"{save_s * 1e3:6.1f} / {load_s * 1e3:.1f} ms", ""),
        ("bytes/token held-out", f"{tok.bytes_per_token(held_out):8.3f}", f"{len(held_out)} docs, last 10%"),
        ("bytes/token train", f"{tok.bytes_per_token(train_docs):8.3f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}} | {'value':>16} | notes")
    print(f"{'-' * width}-+-{'-' * 16}-+------")
    for name, value, note in rows:
        print(f"{name:<{width}} | {value:>16} | {note}")


if __name__ == "__main__":
    main()
