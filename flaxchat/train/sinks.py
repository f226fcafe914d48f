"""Where training events go: the console, a JSONL file, wandb (offline by default).

A sink is a callable (kind, record) with kind in {"train", "eval", "sample", "rollout", "info"}
("rollout": GRPO's per-step sampling statistics and a few graded samples). The flow
adds one more that refreshes a live Metaflow card; the library itself never imports Metaflow.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

Sink = Callable[[str, dict[str, Any]], None]


def console_sink(total_steps: int, stream=sys.stdout) -> Sink:
    def sink(kind: str, r: dict[str, Any]) -> None:
        if kind == "train":
            bar = int(20 * r["step"] / max(total_steps, 1))
            mfu = f" mfu {100 * r['mfu']:.1f}%" if r.get("mfu") == r.get("mfu") and "mfu" in r else ""
            print(f"[{'#' * bar}{'.' * (20 - bar)}] step {r['step']}/{total_steps} loss {r['loss']:.4f} "
                  f"lr×{r['lr_mult']:.3f} {r['tok_per_s']:,.0f} tok/s{mfu}", file=stream, flush=True)
        elif kind == "eval":
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in r.items()
                              if k not in ("step", "val_batches") and isinstance(v, float))
            print(f"  eval @ {r['step']}: {shown}", file=stream, flush=True)
        elif kind == "rollout":
            print(f"  rollout @ {r['step']}: reward {r['reward_mean']:.3f}±{r['reward_std']:.3f}, "
                  f"{r['sampled_len']:.1f} tokens, {r['tool_calls']:.2f} tool calls per sample",
                  file=stream, flush=True)
        elif kind == "sample":
            for s in r["samples"]:
                print(f"  sample @ {r['step']}: {s['prompt']!r} -> {s['completion']!r}", file=stream, flush=True)
        else:
            print(f"  {r.get('message', r)}", file=stream, flush=True)
    return sink


def jsonl_sink(path: str) -> Sink:
    """Append every event to a local JSONL file (kept beside the stage outputs)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def sink(kind: str, r: dict[str, Any]) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps({"kind": kind, **r}, default=float) + "\n")
    return sink


def wandb_sink(project: str, name: str, config: dict[str, Any], directory: str) -> Sink:
    """wandb run; offline unless WANDB_MODE says otherwise ('disabled' turns it off)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    if os.environ["WANDB_MODE"] == "disabled":
        return lambda kind, r: None
    import wandb
    run = wandb.init(project=project, name=name, config=config, dir=directory, reinit="finish_previous")

    def sink(kind: str, r: dict[str, Any]) -> None:
        if kind in ("train", "eval", "rollout"):
            run.log({f"{kind}/{k}": v for k, v in r.items() if k != "step" and isinstance(v, (int, float))},
                    step=r["step"])
        elif kind == "sample":
            run.log({"samples": wandb.Table(columns=["prompt", "completion"],
                                            data=[[s["prompt"], s["completion"]] for s in r["samples"]])},
                    step=r["step"])
    sink.finish = run.finish  # type: ignore[attr-defined]
    return sink
