"""SFT training throughput on CPU: the one training loop's compiled step on packed demo chats.

    uv run python bench/sft_bench.py                      # d4 demo model, T=256, batch 8 and 16 (~2 min)
    uv run python bench/sft_bench.py --batches 4 8 16 32 --steps 10
    uv run python bench/sft_bench.py --quick              # smoke test (~20 s)

What runs is what the SFT stage runs (steps/sft.py), minus checkpoints and evals: the demo
preset's model (depth 4, sequence_len 256; random init, speed does not depend on the weights),
a BPE tokenizer trained here on the generated demo corpus (seconds), the stage's task mixture
(DemoChat x1 + DemoMath x2, `flaxchat.tasks.mixtures.sft_train_mixture`) written to parquet by
`write_conversation_shards`, rendered by `conversation_encoder` and best-fit packed with padding by
`PackedLoader(mode="sft")`; the optimizer is `build_optimizer(cfg.sft, ...)` sharded like
`TrainingStage.build`, and the step is `flaxchat.train.loop.make_train_step` with
`steps.pretrain.pretrain_loss` (one micro-batch per step, no gradient accumulation).

Per batch size: compile seconds, the median wall time of --steps compiled steps after --warmup
untimed ones (each on its own packed batch, already on the device), and from it
  tok/s      all B*T row positions (padding included: it costs the same FLOPs),
  sup tok/s  supervised positions only (targets != -1: assistant text, python calls, <|assistant_end|>),
  pad %      padding positions / packed positions (PackStats.pad_tokens over B*(T+1) per row),
  sup %      supervised share of the target positions,
  fill s     a fresh loader's first batch (reads and renders buffer_docs=1000 conversations),
  loader rows/s  rows it packs per second after that (parquet reads + render + pack as the buffer
             refills, no prefetch thread), over --loader-batches - 1 batches; compare with
  step rows/s    B / step s, the rows one training step consumes per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxchat.config import PipelineConfig, build_config
from flaxchat.data.conversations import conversation_encoder, write_conversation_shards
from flaxchat.data.demo_corpus import generate_documents
from flaxchat.data.loader import PackedLoader
from flaxchat.mesh import create_sharded, create_sharded_optimizer, make_mesh, mesh_context
from flaxchat.model.gpt import GPT
from flaxchat.optim import build_optimizer
from flaxchat.tasks.mixtures import sft_train_mixture, sft_val_mixture
from flaxchat.tokenizer import Tokenizer
from flaxchat.train.loop import _global, make_train_step
from steps.pretrain import pretrain_loss

WORKDIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".bench_out")


def demo_config(depth: int, seq: int, vocab: int, conversations: int, problems: int, val: int,
                dotted: list[str] = ()) -> PipelineConfig:
    return build_config("demo", depth=depth, dotted=[
        f"model.sequence_len={seq}", f"tokenizer.vocab_size={vocab}", f"tasks.demo_conversations={conversations}",
        f"tasks.demo_problems={problems}", f"tasks.demo_val={val}", *dotted])


def demo_tokenizer(cfg: PipelineConfig, docs: int) -> Tokenizer:
    """A BPE tokenizer of cfg's vocab size trained on `docs` generated demo documents (~0.2 s)."""
    return Tokenizer.train(generate_documents(cfg.seed, docs), cfg.tokenizer.vocab_size, doc_cap=cfg.tokenizer.doc_cap)


def sft_shards(cfg: PipelineConfig, out_dir: str) -> list[str]:
    """The SFT stage's demo mixture (train, val) as parquet under out_dir."""
    return write_conversation_shards(sft_train_mixture(cfg), sft_val_mixture(cfg), out_dir)


def sft_loader(cfg: PipelineConfig, shards: list[str], tokenizer: Tokenizer, rows: int) -> PackedLoader:
    T = cfg.model.sequence_len
    return PackedLoader(shards, conversation_encoder(tokenizer), tokenizer.bos_token_id, rows, T,
                        split="train", mode="sft", seed=cfg.seed)


def build_trainer(cfg: PipelineConfig, num_steps: int, loss_fn=pretrain_loss, train_cfg=None):
    """(mesh, model, optimizer, jitted step) wired like TrainingStage.build + the training loop."""
    mesh = make_mesh(cfg.mesh)
    with mesh_context(mesh, cfg.mesh.rules):
        model = create_sharded(lambda: GPT(cfg.model, rngs=nnx.Rngs(cfg.seed)), mesh, cfg.mesh.rules)
        tx = build_optimizer(train_cfg or cfg.sft, cfg.model, num_steps)
        optimizer = create_sharded_optimizer(model, tx, mesh, cfg.mesh.rules)
    return mesh, model, optimizer, make_train_step(model, optimizer, loss_fn)


def stacked(micro: list[dict[str, np.ndarray]], mesh) -> dict[str, jax.Array]:
    """Micro-batches -> the loop's (accum, B, T) global batch."""
    return _global({k: np.stack([mb[k] for mb in micro]) for k in micro[0]}, mesh)


def time_steps(step_fn, model, optimizer, mesh, rules, batches: list[dict[str, jax.Array]], warmup: int
               ) -> tuple[float, list[float], list[float]]:
    """(compile s, per-step seconds of the timed steps, their losses): warm-up steps use batches[:warmup]."""
    with mesh_context(mesh, rules):
        state = nnx.state((model, optimizer))
        bad = jnp.asarray(-1, jnp.int32)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batches[0], jnp.asarray(0, jnp.int32), bad).compile()
        compile_s = time.perf_counter() - t0
        times, losses = [], []
        for i, batch in enumerate(batches):
            t = time.perf_counter()
            state, loss, bad = compiled(state, batch, jnp.asarray(i, jnp.int32), bad)
            losses.append(float(loss))          # the host sync that ends the step
            times.append(time.perf_counter() - t)
        nnx.update((model, optimizer), state)
    return compile_s, times[warmup:], losses[warmup:]


def loader_rate(cfg: PipelineConfig, shards: list[str], tokenizer: Tokenizer, rows: int, n: int
                ) -> tuple[float, float, float, float]:
    """A fresh loader over n batches: (seconds of the first batch, which fills the document buffer;
    rows/s of the other n - 1; padding fraction; supervised fraction of the targets), all n counted
    in the fractions."""
    loader = sft_loader(cfg, shards, tokenizer, rows)
    sup = 0
    t0 = time.perf_counter()
    for i in range(n):
        _, targets = next(loader)
        sup += int((targets != -1).sum())
        if i == 0:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    T = cfg.model.sequence_len
    return (t1 - t0, (n - 1) * rows / (t2 - t1), loader.stats.pad_tokens / (n * rows * (T + 1)),
            sup / (n * rows * T))


def bench(cfg: PipelineConfig, shards: list[str], tokenizer: Tokenizer, rows: int, steps: int, warmup: int,
          loader_batches: int) -> dict:
    T = cfg.model.sequence_len
    loader = sft_loader(cfg, shards, tokenizer, rows)
    host = [next(loader) for _ in range(warmup + steps)]
    mesh, model, optimizer, step_fn = build_trainer(cfg, num_steps=1000)
    batches = [stacked([{"inputs": x, "targets": y}], mesh) for x, y in host]
    compile_s, times, losses = time_steps(step_fn, model, optimizer, mesh, cfg.mesh.rules, batches, warmup)
    step_s = statistics.median(times)
    sup = np.mean([(y != -1).sum() for _, y in host[warmup:]])
    fill_s, rows_s, pad, sup_frac = loader_rate(cfg, shards, tokenizer, rows, loader_batches)
    return {"B": rows, "T": T, "compile_s": compile_s, "step_s": step_s, "tok/s": rows * T / step_s,
            "sup_tok/s": sup / step_s, "pad": pad, "sup": sup_frac, "fill_s": fill_s, "loader_rows/s": rows_s,
            "step_rows/s": rows / step_s, "loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16], help="rows per step (device_batch_size)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256, help="model.sequence_len (row length T)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per batch size (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--loader-batches", type=int, default=40)
    ap.add_argument("--conversations", type=int, default=1500, help="tasks.demo_conversations")
    ap.add_argument("--problems", type=int, default=1000, help="tasks.demo_problems (x2 in the mixture)")
    ap.add_argument("--tokenizer-docs", type=int, default=2000)
    ap.add_argument("--workdir", default=os.path.join(WORKDIR, "sft_bench"), help="where the parquet shards go")
    ap.add_argument("--set", dest="dotted", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set model.compute_dtype=bfloat16")
    ap.add_argument("--quick", action="store_true", help="smoke test: depth 2, T=128, batch 4, 2 steps")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.depth, args.seq, args.vocab, args.steps, args.warmup = [4], 2, 128, 512, 2, 1
        args.loader_batches, args.conversations, args.problems, args.tokenizer_docs = 8, 200, 100, 300

    cfg = demo_config(args.depth, args.seq, args.vocab, args.conversations, args.problems, 50, args.dotted)
    t0 = time.perf_counter()
    tokenizer = demo_tokenizer(cfg, args.tokenizer_docs)
    shards = sft_shards(cfg, args.workdir)
    mc = cfg.model
    print(f"backend={jax.default_backend()} devices={jax.device_count()} kind={jax.devices()[0].device_kind}")
    print(f"model d{mc.depth} dim {mc.n_embd} T {mc.sequence_len} vocab {mc.vocab_size} {mc.compute_dtype}; "
          f"tokenizer + {args.conversations} chats + {2 * args.problems} problems in {time.perf_counter() - t0:.1f} s; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'B':>4} {'T':>5} {'compile s':>9} {'step s':>8} {'tok/s':>9} {'sup tok/s':>9} {'pad %':>6} "
          f"{'sup %':>6} {'fill s':>6} {'loader rows/s':>13} {'step rows/s':>11}")
    for rows in args.batches:
        r = bench(cfg, shards, tokenizer, rows, args.steps, args.warmup, args.loader_batches)
        print(f"{r['B']:>4} {r['T']:>5} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['tok/s']:>9,.0f} "
              f"{r['sup_tok/s']:>9,.0f} {100 * r['pad']:>6.1f} {100 * r['sup']:>6.1f} {r['fill_s']:>6.2f} "
              f"{r['loader_rows/s']:>13,.0f} "
              f"{r['step_rows/s']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
