"""CORE eval throughput: examples/s of `flaxchat.eval.core.evaluate_task` on a multiple-choice task.

    uv run python bench/core_eval_bench.py                 # d4 demo model, T=256, batch_rows 8/16/32 (~1 min)
    uv run python bench/core_eval_bench.py --rows 16 64 --items 400 --repeats 5
    uv run python bench/core_eval_bench.py --quick         # smoke test (~15 s)

The model is the demo preset's (depth 4, sequence_len 256, random init: speed does not depend on
the weights), the tokenizer a BPE of the preset's vocab trained here on generated demo documents
(as bench/sft_bench.py gets one). The task is generated like hellaswag_zeroshot: --items items,
4 choices of 2-8 words, ~--query-tokens-token queries cut from demo documents, --fewshot shots.

Per batch_rows: compile s (first call minus the median), the median seconds of --repeats full
passes over the task after it (host prompt rendering + tokenization + spans, the jitted forwards,
the host reductions), examples/s and rows/s (one row per choice) from that median, and the share
of that time spent preparing rows on the host (render + tokenize, measured separately).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import jax
from flax import nnx

from flaxchat.config import build_config
from flaxchat.data.demo_corpus import generate_documents
from flaxchat.eval import core
from flaxchat.eval.bundle import CoreTask
from flaxchat.model.gpt import GPT
from flaxchat.tokenizer import Tokenizer


def make_task(docs: list[str], tokenizer: Tokenizer, items: int, query_tokens: int, fewshot: int,
              seed: int = 0) -> CoreTask:
    rng = random.Random(seed)
    words = [w for d in docs for w in d.split()]
    examples = []
    for i in range(items):
        doc = docs[i % len(docs)]
        ids = tokenizer.encode(doc)
        start = rng.randrange(max(1, len(ids) - query_tokens))
        query = tokenizer.decode(ids[start:start + query_tokens]).strip()
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(4)]
        examples.append({"query": query, "choices": choices, "gold": rng.randrange(4)})
    return CoreTask(label="generated_mc", task_type="multiple_choice", num_fewshot=fewshot,
                    continuation_delimiter=" ", random_baseline=0.25, examples=examples)


def bench(model, tokenizer, task: CoreTask, rows: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    first = core.evaluate_task(model, tokenizer, task, batch_rows=rows)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = core.evaluate_task(model, tokenizer, task, batch_rows=rows)
        times.append(time.perf_counter() - t)
        assert r["accuracy"] == first["accuracy"]
    med = statistics.median(times)
    n_rows = sum(len(ex["choices"]) for ex in task.examples)
    return {"rows": rows, "compile_s": max(0.0, first_s - med), "pass_s": med, "ex/s": len(task.examples) / med,
            "rows/s": n_rows / med, "acc": first["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32], help="batch_rows values")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256, help="model.sequence_len")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--query-tokens", type=int, default=40)
    ap.add_argument("--fewshot", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per batch_rows (median reported)")
    ap.add_argument("--tokenizer-docs", type=int, default=2000)
    ap.add_argument("--set", dest="dotted", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set model.compute_dtype=bfloat16")
    ap.add_argument("--quick", action="store_true", help="smoke test: depth 2, T=128, 40 items, rows 8, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.depth, args.seq, args.vocab, args.items, args.repeats = [8], 2, 128, 512, 40, 2
        args.tokenizer_docs = 300

    cfg = build_config("demo", depth=args.depth, dotted=[f"model.sequence_len={args.seq}",
                                                         f"tokenizer.vocab_size={args.vocab}", *args.dotted])
    t0 = time.perf_counter()
    docs = generate_documents(cfg.seed, args.tokenizer_docs)
    tokenizer = Tokenizer.train(docs, cfg.tokenizer.vocab_size, doc_cap=cfg.tokenizer.doc_cap)
    task = make_task(docs, tokenizer, args.items, args.query_tokens, args.fewshot)
    model = GPT(cfg.model, rngs=nnx.Rngs(cfg.seed))
    setup_s = time.perf_counter() - t0
    t = time.perf_counter()
    prepared = core.prepare_examples(task, tokenizer, cfg.model.sequence_len)
    prep_s = time.perf_counter() - t
    lens = [len(r) for ex in prepared for r in ex.tokens]
    buckets = sorted({core.bucket_len(n, cfg.model.sequence_len) for n in lens})
    mc = cfg.model
    print(f"backend={jax.default_backend()} devices={jax.device_count()} kind={jax.devices()[0].device_kind}")
    print(f"model d{mc.depth} dim {mc.n_embd} T {mc.sequence_len} vocab {mc.vocab_size} {mc.compute_dtype}; "
          f"setup {setup_s:.1f} s; task {len(task.examples)} items x 4 choices, {args.fewshot}-shot, "
          f"row tokens {min(lens)}-{max(lens)} (mean {sum(lens) / len(lens):.0f}), buckets {buckets}; "
          f"host prep {prep_s:.3f} s/pass; median of {args.repeats} passes")
    print(f"{'rows':>5} {'compile s':>9} {'pass s':>8} {'ex/s':>8} {'rows/s':>8} {'prep %':>6} {'acc':>6}")
    for rows in args.rows:
        r = bench(model, tokenizer, task, rows, args.repeats)
        print(f"{r['rows']:>5} {r['compile_s']:>9.2f} {r['pass_s']:>8.3f} {r['ex/s']:>8.1f} {r['rows/s']:>8.1f} "
              f"{100 * prep_s / r['pass_s']:>6.1f} {r['acc']:>6.3f}", flush=True)


if __name__ == "__main__":
    main()
