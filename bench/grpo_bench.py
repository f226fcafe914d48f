"""GRPO on CPU: rollout throughput with calculator tool calls, and the policy-update step.

    uv run python bench/grpo_bench.py                     # d4 demo policy; P x G = 4x4, 8x8, 16x16 (~6 min, ~3.5 cached)
    uv run python bench/grpo_bench.py --sizes 8x8 --rounds 3
    uv run python bench/grpo_bench.py --quick             # smoke test (~30 s)

The policy has to *call* the calculator, or rollouts measure plain decoding: random weights never
emit <|python_start|>. So the bench trains one first, with the SFT bench's pieces
(bench/sft_bench.py: the demo model, a demo-corpus tokenizer, `PackedLoader(mode="sft")`,
`build_optimizer(cfg.sft, ...)`, `make_train_step` + `pretrain_loss`) for --policy-steps steps on
DemoMath word problems only, from random init (60 steps at batch 8 take ~2 min on 2 cores; the
result calls the tool ~2 times per answer, mostly with garbled arithmetic, so rewards stay low).
The policy (tokenizer + params) is cached under --workdir (.bench_out/, git-ignored), keyed by its
shape and steps: later runs only measure. No `_steer`: every tool call below was sampled.

Per P prompts x G samples (the stage's `RolloutSource`, rl config = the demo preset's `cfg.rl`
with P and G replaced, so max_new_tokens, temperature and top-k are the preset's; row_len as
steps/grpo.py sets it), one untimed round (it compiles the engine's batch bucket), then --rounds timed rounds
(`RolloutSource.rollout(r)`: sample with tools, grade, advantages, lay out rows), medians of:
  s/round     wall seconds of a round, of which gen % is inside `Engine.generate`,
  sampled/s   tokens the policy sampled (forced=0) per second of the round,
  total/s     all generated tokens incl. forced tool output (<|output_start|> value <|output_end|>),
  calls       sampled <|python_start|> per sample; stops = times per round the decode loop returned
              to the host to serve tools; sandbox % = calls the calculator refused, run in the
              python sandbox instead (a subprocess each, the slow path);
  reward      mean exact-match reward.
Then the update: `make_train_step` with `grpo_loss_fn(clip_low, clip_high, kl_beta)` and the
optimizer from `build_optimizer(cfg.grpo, ...)`, on the round's micro-batches stacked as the loop
stacks them (accum = P*G / --micro micro-batches of --micro rows): compile s, median step s over
--update-steps steps after one warm-up, tok/s over all row positions and over sampled targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sft_bench import (WORKDIR, build_trainer, demo_config, demo_tokenizer, sft_loader,  # noqa: E402
                       stacked, time_steps)

import flaxchat.inference.engine as engine_mod  # noqa: E402
from flaxchat.calculator import use_calculator  # noqa: E402
from flaxchat.config import PipelineConfig  # noqa: E402
from flaxchat.data.conversations import write_conversation_shards  # noqa: E402
from flaxchat.inference.engine import Engine  # noqa: E402
from flaxchat.model.gpt import GPT  # noqa: E402
from flaxchat.rl.objective import grpo_loss_fn  # noqa: E402
from flaxchat.rl.rollouts import RolloutSource  # noqa: E402
from flaxchat.tasks.demo import DemoMath  # noqa: E402
from flaxchat.tokenizer import Tokenizer  # noqa: E402
from steps.grpo import row_length  # noqa: E402


# ---------------------------------------------------------------------- the policy
def _flat(model) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def _load_flat(model, flat: dict[str, np.ndarray]) -> None:
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(
        treedef, [jax.device_put(jnp.asarray(flat[jax.tree_util.keystr(p)], x.dtype), getattr(x, "sharding", None))
                  for p, x in paths]))
    nnx.update(model, state)


def trained_policy(cfg: PipelineConfig, workdir: str, steps: int, rows: int, problems: int, docs: int
                   ) -> tuple[Tokenizer, dict[str, np.ndarray], str]:
    """(tokenizer, params, how it was obtained): SFT on DemoMath from scratch, cached in workdir."""
    m = cfg.model
    out = os.path.join(workdir, f"policy-d{m.depth}-T{m.sequence_len}-v{m.vocab_size}-{steps}x{rows}steps-s{cfg.seed}")
    params_file = os.path.join(out, "params.npz")
    if os.path.exists(params_file):
        with np.load(params_file) as z:
            return Tokenizer.load(os.path.join(out, "tokenizer")), dict(z), f"cached {out}"
    t0 = time.perf_counter()
    tokenizer = demo_tokenizer(cfg, docs)
    shards = write_conversation_shards(DemoMath(cfg.seed, problems), DemoMath(cfg.seed, 20, split="val", train_n=problems),
                                       os.path.join(out, "data"))
    loader = sft_loader(cfg, shards, tokenizer, rows)
    mesh, model, optimizer, step_fn = build_trainer(cfg, num_steps=steps)
    batches = [stacked([{"inputs": x, "targets": y}], mesh) for x, y in (next(loader) for _ in range(steps))]
    _, _, losses = time_steps(step_fn, model, optimizer, mesh, cfg.mesh.rules, batches, warmup=0)
    flat = _flat(model)
    tokenizer.save(os.path.join(out, "tokenizer"))
    np.savez(params_file + ".tmp.npz", **flat)
    os.replace(params_file + ".tmp.npz", params_file)
    how = (f"trained {out} in {time.perf_counter() - t0:.0f} s ({steps} SFT steps x {rows} rows on DemoMath, "
           f"loss {losses[0]:.2f} -> {losses[-1]:.2f})")
    return tokenizer, flat, how


# ---------------------------------------------------------------------- instrumentation
class ToolCounter:
    """Counts the engine's tool runs (and calculator refusals) by wrapping flaxchat.inference.engine.run_tool."""

    def __init__(self):
        self.calls = self.sandbox = 0
        self._run = engine_mod.run_tool

    def __enter__(self):
        def counted(expr, *a, **kw):
            self.calls += 1
            self.sandbox += use_calculator(expr) is None
            return self._run(expr, *a, **kw)
        engine_mod.run_tool = counted
        return self

    def __exit__(self, *exc):
        engine_mod.run_tool = self._run


class TimedEngine:
    """The engine RolloutSource sees: records each generate call's completions, time and tool stops."""

    def __init__(self, engine: Engine):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.outs, self.gen_s, self.stops = [], 0.0, 0
        serve = engine._serve_tools

        def counted(*a, **kw):
            self.stops += 1
            return serve(*a, **kw)
        engine._serve_tools = counted

    def reset(self) -> None:
        self.outs, self.gen_s, self.stops = [], 0.0, 0

    def generate(self, *a, **kw):
        t0 = time.perf_counter()
        out = self.engine.generate(*a, **kw)
        self.gen_s += time.perf_counter() - t0
        self.outs = out
        return out


# ---------------------------------------------------------------------- one P x G
def bench_size(cfg: PipelineConfig, tokenizer, policy: GPT, task, P: int, G: int, micro: int, rounds: int,
               update_steps: int, params: dict[str, np.ndarray]) -> dict:
    rl = dataclasses.replace(cfg.rl, prompts_per_step=P, samples_per_prompt=G)
    row_len = row_length((task,), tokenizer, rl.max_new_tokens, cfg.model.sequence_len)
    eng = TimedEngine(Engine(policy, tokenizer, max_len=row_len))
    rows_per_micro = min(micro, P * G)
    source = RolloutSource(eng, task, rl, seed=cfg.seed, row_len=row_len, rows_per_micro=rows_per_micro)
    py = tokenizer.encode_special("<|python_start|>")
    per_round = []
    for r in range(rounds + 1):                      # round 0 compiles this batch bucket: untimed
        eng.reset()
        with ToolCounter() as tools:
            t0 = time.perf_counter()
            micro_batches = source.rollout(r)
            secs = time.perf_counter() - t0
        flat = [c for samples in eng.outs for c in samples]
        sampled = sum(len(c.tokens) - sum(c.forced) for c in flat)
        total = sum(len(c.tokens) for c in flat)
        calls = sum(1 for c in flat for t, f in zip(c.tokens, c.forced) if t == py and not f)
        conversations = [task.example(i) for i in source.prompt_indices(r)]
        reward = np.mean([task.reward(conv, c.text) for conv, samples in zip(conversations, eng.outs) for c in samples])
        per_round.append({"s": secs, "gen": eng.gen_s / secs, "sampled/s": sampled / secs, "total/s": total / secs,
                          "calls": calls / len(flat), "stops": eng.stops,
                          "sandbox": tools.sandbox / max(tools.calls, 1), "reward": reward})
    timed = per_round[1:]
    r = {k: statistics.median(x[k] for x in timed) for k in timed[0]}
    r.update(P=P, G=G, row_len=row_len, first_s=per_round[0]["s"])

    # the update step on the last round's micro-batches, as the training loop stacks them
    loss_fn = grpo_loss_fn(rl.clip_low, rl.clip_high, rl.kl_beta)
    mesh, model, optimizer, step_fn = build_trainer(cfg, num_steps=30, loss_fn=loss_fn, train_cfg=cfg.grpo)
    _load_flat(model, params)
    batch = stacked(micro_batches, mesh)
    compile_s, times, _ = time_steps(step_fn, model, optimizer, mesh, cfg.mesh.rules, [batch] * (update_steps + 1), 1)
    step_s = statistics.median(times)
    n_tok = len(micro_batches) * rows_per_micro * row_len
    sup = sum(int((mb["targets"] != -1).sum()) for mb in micro_batches)
    r.update(accum=len(micro_batches), upd_compile_s=compile_s, upd_step_s=step_s, upd_tok_s=n_tok / step_s,
             upd_sampled_s=sup / step_s)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["4x4", "8x8", "16x16"], help="P x G (prompts x samples)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rollout rounds per size (after one untimed)")
    ap.add_argument("--update-steps", type=int, default=2, help="timed update steps per size (after one warm-up)")
    ap.add_argument("--micro", type=int, default=16, help="rows per micro-batch (the demo's grpo.device_batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="rl.max_new_tokens (default: the preset's)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--problems", type=int, default=1000, help="DemoMath problems (policy SFT data and RL prompts)")
    ap.add_argument("--policy-steps", type=int, default=60, help="SFT steps that teach the policy the tool")
    ap.add_argument("--policy-rows", type=int, default=8, help="rows per policy SFT step")
    ap.add_argument("--tokenizer-docs", type=int, default=2000)
    ap.add_argument("--workdir", default=os.path.join(WORKDIR, "grpo_bench"))
    ap.add_argument("--set", dest="dotted", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set rl.top_k=0")
    ap.add_argument("--quick", action="store_true", help="smoke test: depth 2, T=128, 4 policy steps, 2x2, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.update_steps, args.depth, args.seq, args.vocab = ["2x2"], 1, 1, 2, 128, 512
        args.problems, args.policy_steps, args.policy_rows, args.tokenizer_docs = 100, 4, 4, 300
        args.max_new_tokens = args.max_new_tokens or 24
    dotted = list(args.dotted) + ([f"rl.max_new_tokens={args.max_new_tokens}"] if args.max_new_tokens else [])
    cfg = demo_config(args.depth, args.seq, args.vocab, 1, args.problems, 20, dotted)

    tokenizer, params, how = trained_policy(cfg, args.workdir, args.policy_steps, args.policy_rows, args.problems,
                                            args.tokenizer_docs)
    policy = GPT(cfg.model, rngs=nnx.Rngs(cfg.seed))
    _load_flat(policy, params)
    task = DemoMath(cfg.seed, args.problems)
    mc, rl = cfg.model, cfg.rl
    print(f"backend={jax.default_backend()} devices={jax.device_count()} kind={jax.devices()[0].device_kind}")
    print(f"policy: {how}")
    print(f"model d{mc.depth} dim {mc.n_embd} vocab {mc.vocab_size}; tool calls sampled by the policy (no _steer); "
          f"max_new_tokens {rl.max_new_tokens}, temperature {rl.temperature}, top_k {rl.top_k}; "
          f"medians of {args.rounds} rounds / {args.update_steps} update steps")
    print(f"{'PxG':>6} {'row':>4} {'1st s':>6} {'s/round':>7} {'gen %':>5} {'sampled/s':>9} {'total/s':>8} "
          f"{'calls':>5} {'stops':>5} {'sandbox %':>9} {'reward':>6} | {'accum':>5} {'compile s':>9} "
          f"{'upd s':>6} {'upd tok/s':>9} {'sampled/s':>9}")
    for size in args.sizes:
        P, G = (int(x) for x in size.lower().split("x"))
        r = bench_size(cfg, tokenizer, policy, task, P, G, args.micro, args.rounds, args.update_steps, params)
        print(f"{f'{P}x{G}':>6} {r['row_len']:>4} {r['first_s']:>6.1f} {r['s']:>7.2f} {100 * r['gen']:>5.0f} "
              f"{r['sampled/s']:>9,.0f} {r['total/s']:>8,.0f} {r['calls']:>5.2f} {r['stops']:>5.0f} "
              f"{100 * r['sandbox']:>9.0f} {r['reward']:>6.3f} | {r['accum']:>5} {r['upd_compile_s']:>9.1f} "
              f"{r['upd_step_s']:>6.2f} {r['upd_tok_s']:>9,.0f} {r['upd_sampled_s']:>9,.0f}", flush=True)


if __name__ == "__main__":
    main()
