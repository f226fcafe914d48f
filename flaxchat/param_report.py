"""Parameter counts of the GPT by depth, grouped like nanochat's num_scaling_params.

    uv run python -m flaxchat.param_report                 # d4, d12, d20, d24 at vocab 32768
    uv run python -m flaxchat.param_report --depths 8 26 --vocab 65536

Counts are read off the model's own (abstract, allocation-free) parameters and checked against
nanochat's formula (flaxchat.model.flops.param_counts). The layout keeps nanochat's exact count: value
embeddings are one (n_ve, V, kv) table for the n_ve = ceil(L/2) alternating layers, ve_gate is
(n_ve, 12, Hkv), and smear_gate (24x1) + smear_lambda + backout_lambda + the two per-layer lambda
vectors are the "scalars" group. So d24 has nanochat's 1,384,122,122 parameters ("1.38B"), of which
only 0.68B are block matrices: 0.60B are the 12 value-embedding tables and 0.10B wte + lm_head.
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

from flaxchat.config import ModelConfig
from flaxchat.model.flops import estimate_flops, num_matmul_params, param_counts
from flaxchat.model.gpt import GPT

GROUPS = ("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "total")


def model_counts(cfg: ModelConfig) -> dict[str, int]:
    """Group sizes of an abstract GPT (jax.ShapeDtypeStruct leaves: nothing is allocated)."""
    model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0), backend="cpu"))
    tree = model.param_tree()
    size = lambda t: sum(int(x.size) for x in jax.tree.leaves(t))
    counts = {
        "wte": size(tree["wte"]),
        "value_embeds": size(tree["value_embeds"]),
        "lm_head": size(tree["lm_head"]),
        "transformer_matrices": size(tree["blocks"]),
        "scalars": size([tree[k] for k in ("resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda", "backout_lambda")]),
    }
    counts["total"] = sum(counts.values())
    return counts


def report(depths: list[int], vocab: int, seq: int) -> str:
    head = f"{'depth':>5} {'n_embd':>6} {'heads':>5} " + " ".join(f"{g:>21}" for g in GROUPS) + \
        f" {'matmul':>13} {'GFLOP/token':>11} {'vs nanochat':>11}"
    lines = [f"vocab {vocab} (padded to a multiple of 64), sequence {seq}", head]
    for depth in depths:
        cfg = ModelConfig(depth=depth, vocab_size=vocab, sequence_len=seq)
        cfg.derive()
        got, want = model_counts(cfg), param_counts(cfg)
        diff = got["total"] - want["total"]
        lines.append(f"{depth:>5} {cfg.n_embd:>6} {cfg.n_head:>5} " + " ".join(f"{got[g]:>21,}" for g in GROUPS)
                     + f" {num_matmul_params(cfg):>13,} {estimate_flops(cfg) / 1e9:>11.3f} {diff:>+11,}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="GPT parameter counts by depth")
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 12, 20, 24])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    print(report(args.depths, args.vocab, args.seq))


if __name__ == "__main__":
    main()
