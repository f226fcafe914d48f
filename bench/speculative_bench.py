"""Speculative decoding speed-up with a trained draft and target (batch 1, greedy, held-out prompts).

    uv run python bench/speculative_bench.py                       # CPU: d12 target, d4 draft, demo corpus
    uv run python bench/speculative_bench.py --ks 2 4 --tokens 64  # quicker
    uv run python bench/speculative_bench.py --gpu                 # bf16, max_len 2048 (on a GPU machine)

Acceptance is a property of two *trained* models agreeing, so the pair is trained first with the
pipeline's own stages (tokenizer + pretrain on the preset's corpus, the same code the flow runs) and
cached in --workdir: the first CPU run trains a d4 draft (200 steps, ~5 min on 2 cores) and a d12
target (120 steps, ~55 min) on the demo corpus; later runs only measure (~5 min). Random weights would measure nothing
but overhead: a random draft never agrees with a random target.

Per prompt (the start of a held-out document), one plain greedy `generate` of the target and one
speculative `generate` per k, both already compiled; stop tokens are off so every call produces
exactly --tokens tokens. Reported: tokens/s of each, the speed-up (ratio of summed wall times),
tokens emitted per target forward, and whether the speculative tokens equal the plain ones (they
must: greedy speculative decoding is exact). The draft's own plain decode rate gives the cost
ratio c = draft step / target step that bounds the speed-up: (tokens per forward) / (1 + (k+1) c).
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from flaxchat import storage
from flaxchat.chat.loading import load_chat_model
from flaxchat.config import build_config
from flaxchat.data.sources import iter_documents
from flaxchat.inference.engine import Engine
from flaxchat.manifest import MANIFEST_NAME, read_manifest


def _trained(out: str, train) -> str:
    if not storage.exists(storage.join(out, MANIFEST_NAME)):
        t0 = time.perf_counter()
        train(out)
        print(f"  trained {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def train_pair(workdir: str, preset: str, target: tuple[int, int], draft: tuple[int, int],
               dotted: list[str]) -> tuple[str, str, list[str]]:
    """-> (target stage dir, draft stage dir, data shards), training what workdir lacks."""
    from steps import pretrain, tokenizer
    base = build_config(preset, dotted=dotted, artifact_root=workdir)
    tok_dir = _trained(os.path.join(workdir, "tokenizer"), lambda out: tokenizer.run(base, {}, out))
    tok_manifest = read_manifest(tok_dir)
    dirs = []
    for depth, steps in (target, draft):
        cfg = build_config(preset, depth=depth, artifact_root=workdir, dotted=dotted + [
            f"pretrain.num_steps={steps}", f"pretrain.eval_every={max(steps // 3, 1)}", "pretrain.sample_every=0",
            f"pretrain.checkpoint_every={steps}"])
        dirs.append(_trained(os.path.join(workdir, f"{preset}-d{depth}-{steps}steps"),
                             lambda out, cfg=cfg: pretrain.run(cfg, {"tokenizer": tok_manifest}, out)))
    return dirs[0], dirs[1], tok_manifest["data"]["shards"]


def held_out_prompts(shards: list[str], tokenizer, n: int, length: int) -> list[list[int]]:
    prompts = []
    for text in iter_documents(shards, "val"):
        ids = tokenizer.encode(text)
        if len(ids) >= length:
            prompts.append([tokenizer.bos_token_id] + ids[:length - 1])
        if len(prompts) == n:
            break
    return prompts


def timed_generate(engine: Engine, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]], int]:
    """(seconds for all prompts one at a time, their tokens, target forwards) after a warm-up call."""
    kw = dict(max_tokens=tokens, temperature=0.0, stop_tokens=[], use_tools=False)
    engine.generate(prompts[:1], **kw)
    secs, outs, forwards = 0.0, [], 0
    for p in prompts:
        t0 = time.perf_counter()
        outs.append(engine.generate([p], **kw)[0][0].tokens)
        secs += time.perf_counter() - t0
        spec = engine._speculative
        forwards += spec.last_target_forwards if spec else len(outs[-1])
    return secs, outs, forwards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/flaxchat/speculative_bench"))
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--target-depth", type=int, default=12)
    ap.add_argument("--target-steps", type=int, default=120)
    ap.add_argument("--draft-depth", type=int, default=4)
    ap.add_argument("--draft-steps", type=int, default=200)
    ap.add_argument("--set", dest="dotted", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both models, e.g. --set model.compute_dtype=bfloat16")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=None, help="engine max_len (default: the model's sequence_len)")
    ap.add_argument("--gpu", action="store_true", help="bf16 compute, max_len 2048")
    args = ap.parse_args()
    dotted = list(args.dotted) + (["model.compute_dtype=bfloat16"] if args.gpu else [])
    max_len = args.max_len or (2048 if args.gpu else None)

    tdir, ddir, shards = train_pair(args.workdir, args.preset, (args.target_depth, args.target_steps),
                                    (args.draft_depth, args.draft_steps), dotted)
    target, draft = load_chat_model(tdir), load_chat_model(ddir)
    for name, m in (("target", target), ("draft", draft)):
        print(f"{name}: d{m.config.model.depth}, {m.step} steps, val bpb {m.manifest['metrics']['val_bpb']:.3f}")
    prompts = held_out_prompts(shards, target.tokenizer, args.prompts, args.prompt_len)
    if not prompts:
        raise SystemExit(f"no held-out document has {args.prompt_len} tokens; lower --prompt-len")
    n_tok = len(prompts) * args.tokens
    plain = Engine(target.model, target.tokenizer, max_len=max_len)
    base_s, want, _ = timed_generate(plain, prompts, args.tokens)
    draft_s, _, _ = timed_generate(Engine(draft.model, draft.tokenizer, max_len=max_len), prompts, args.tokens)
    c = base_s and draft_s / base_s
    print(f"device {jax.devices()[0].device_kind}; {len(prompts)} prompts x {args.tokens} tokens, batch 1, greedy")
    print(f"target alone {n_tok / base_s:8.1f} tok/s;  draft alone {n_tok / draft_s:8.1f} tok/s (cost ratio c = {c:.3f})")
    print(f"{'k':>3} {'tok/s':>9} {'speed-up':>8} {'tok/fwd':>8} {'bound':>6} {'same tokens':>11}")
    for k in args.ks:
        eng = Engine(target.model, target.tokenizer, max_len=max_len, draft=draft.model, spec_k=k)
        secs, got, forwards = timed_generate(eng, prompts, args.tokens)
        per_fwd = n_tok / forwards
        print(f"{k:>3} {n_tok / secs:>9.1f} {base_s / secs:>8.2f} {per_fwd:>8.2f} {per_fwd / (1 + (k + 1) * c):>6.2f} "
              f"{str(got == want):>11}", flush=True)


if __name__ == "__main__":
    main()
