"""Chat-eval throughput: categorical (letter logits) and generative (engine + grading) examples/s.

    uv run python bench/chat_eval_bench.py              # d4 demo model, DemoChoice x256, DemoMath x64 (~minutes)
    uv run python bench/chat_eval_bench.py --quick      # smoke test (~30 s)

What runs is flaxchat.eval.chat_eval as the eval stage calls it: the demo preset's model (depth 4,
sequence_len 256; random init, speed does not depend on the weights) and a BPE tokenizer of the
preset's vocab trained here on generated demo documents (as bench/sft_bench.py gets one).
  categorical  `categorical_accuracy` on DemoChoice (--items questions) at each --rows
               (batch_rows): prompts rendered, bucketed, one jitted forward per batch, letters graded.
  generative   `generative_accuracy` on held-out DemoMath (--problems problems, greedy,
               --max-new-tokens, one sample) through the batched Engine at each --batch-problems.
Per setting: `first s` is the first call (compiles included), then the median of --repeats
further calls (nothing compiles) gives examples/s. Random weights rarely stop early, so generative
rows mostly run the full --max-new-tokens; a trained model stops sooner.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from flax import nnx

from flaxchat.config import build_config
from flaxchat.data.demo_corpus import generate_documents
from flaxchat.inference.engine import Engine
from flaxchat.eval.chat_eval import categorical_accuracy, compile_counts, generative_accuracy
from flaxchat.model.gpt import GPT
from flaxchat.tasks.demo import DemoMath
from flaxchat.tasks.demo_choice import DemoChoice
from flaxchat.tokenizer import Tokenizer


def timed(fn, repeats: int) -> tuple[float, list[float], dict]:
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256, help="model.sequence_len (also the engine's max_len)")
    ap.add_argument("--items", type=int, default=256, help="DemoChoice questions")
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32], help="categorical batch_rows")
    ap.add_argument("--problems", type=int, default=64, help="DemoMath problems")
    ap.add_argument("--batch-problems", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the first (median reported)")
    ap.add_argument("--docs", type=int, default=2000, help="demo documents the tokenizer is trained on")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.items, args.rows, args.problems, args.batch_problems = 32, [8], 8, [8]
        args.max_new_tokens, args.repeats, args.docs = 16, 1, 300

    cfg = build_config("demo", depth=args.depth, dotted=[f"model.sequence_len={args.seq}"])
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train(generate_documents(cfg.seed, args.docs), cfg.tokenizer.vocab_size,
                                doc_cap=cfg.tokenizer.doc_cap)
    model = GPT(cfg.model, rngs=nnx.Rngs(cfg.seed))
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), depth {args.depth}, "
          f"seq {args.seq}, vocab {cfg.tokenizer.vocab_size}, dtype {model.spec.compute_dtype}; "
          f"setup {time.perf_counter() - t0:.1f}s")

    print(f"\ncategorical: DemoChoice x{args.items} (letter logits at each prompt's last position)")
    print(f"{'rows':>5} {'first s':>8} {'median s':>9} {'ex/s':>8} {'compiles':>9} {'acc':>6}")
    choice = DemoChoice(cfg.seed, args.items)
    for rows in args.rows:
        before = compile_counts["categorical"]
        first, times, res = timed(lambda: categorical_accuracy(model, tokenizer, choice, batch_rows=rows),
                                  args.repeats)
        med = statistics.median(times) if times else first
        print(f"{rows:>5} {first:>8.2f} {med:>9.3f} {res['n'] / med:>8.1f} "
              f"{compile_counts['categorical'] - before:>9} {res['accuracy']:>6.3f}")

    print(f"\ngenerative: DemoMath x{args.problems} (greedy, max_new_tokens {args.max_new_tokens}, tools on)")
    print(f"{'batch':>5} {'first s':>8} {'median s':>9} {'ex/s':>8} {'compiles*':>9} {'acc':>6}")
    math = DemoMath(cfg.seed, args.problems, split="val", train_n=cfg.tasks.demo_problems)
    engine = Engine(model, tokenizer)
    for bp in args.batch_problems:
        first, times, res = timed(lambda: generative_accuracy(engine, math, max_new_tokens=args.max_new_tokens,
                                                              batch_problems=bp), args.repeats)
        med = statistics.median(times) if times else first
        print(f"{bp:>5} {first:>8.2f} {med:>9.3f} {res['n'] / med:>8.1f} {engine.compile_count:>9} "
              f"{res['accuracy']:>6.3f}")
    print("\nex/s = examples / median call; compiles* = the engine's cumulative token-loop compilations")


if __name__ == "__main__":
    main()
