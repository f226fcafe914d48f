"""Where training events go: the console, a JSONL log (local file or object store), wandb (offline by default).

A sink is a callable (kind, record) with kind in {"train", "eval", "sample", "rollout", "info"}
("rollout": GRPO's per-step sampling statistics and a few graded samples). The flow
adds one more that refreshes a live Metaflow card; the library itself never imports Metaflow.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any, Callable

from flaxchat import storage

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


# Remote logs are rewritten whole at most this often (seconds) or after this many pending records;
# eval/sample/info events and finish() write at once. Overridable per process (the flow tests flush
# every record so a killed task's log is exact).
FLUSH_EVERY_S = 30.0
FLUSH_EVERY_RECORDS = 100
_URGENT = ("eval", "sample", "info")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; unset it or give seconds/records") from None


def jsonl_sink(path: str, *, flush_every_s: float | None = None, flush_every_records: int | None = None,
               clock: Callable[[], float] = time.monotonic) -> Sink:
    """Append every event as one JSON line to `path`, a local file or any storage URI (gs://, …).

    Locally each record is appended and flushed at once. An object store cannot append, so there the
    log is rewritten whole (append-by-rewrite: one small upload, the object always a complete prefix
    of the log) once `flush_every_records` records are pending or `flush_every_s` seconds have passed
    since the last write, checked when a record arrives, on the caller's thread, with no device sync
    (records are already host values); eval/sample/info records and `finish()` write at once. A hard
    kill loses at most the records of the last interval; an exception loses nothing (the training
    stage calls `finish` on the way out). A failed write warns and is retried with the next records
(finish() raises). A log that already exists is continued, as locally.
    Defaults: FLAXCHAT_LOG_FLUSH_S (30 s) and FLAXCHAT_LOG_FLUSH_RECORDS (100).

    Cost: a rewrite uploads the whole log, which stays small (10k records ≈ 3 MB)."""
    if not storage.is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

        def sink(kind: str, r: dict[str, Any]) -> None:
            with open(path, "a") as fh:
                fh.write(json.dumps({"kind": kind, **r}, default=float) + "\n")
        sink.finish = lambda: None  # type: ignore[attr-defined]
        return sink

    every_s = _env_number("FLAXCHAT_LOG_FLUSH_S", FLUSH_EVERY_S) if flush_every_s is None else flush_every_s
    every_n = int(_env_number("FLAXCHAT_LOG_FLUSH_RECORDS", FLUSH_EVERY_RECORDS)
                  if flush_every_records is None else flush_every_records)
    lines: list[str] = [storage.read_text(path)] if storage.exists(path) else []
    state = {"pending": 0, "last": clock()}

    def flush() -> None:
        if state["pending"]:
            storage.write_text(path, "".join(lines))
            state["pending"], state["last"] = 0, clock()

    def sink(kind: str, r: dict[str, Any]) -> None:
        lines.append(json.dumps({"kind": kind, **r}, default=float) + "\n")
        state["pending"] += 1
        if kind in _URGENT or state["pending"] >= every_n or clock() - state["last"] >= every_s:
            try:
                flush()
            except storage.StorageError as exc:
                # a failed log upload must not end hours of training: the records stay pending and
                # go with the next write; finish() raises if the store still refuses them
                state["last"] = clock()
                warnings.warn(f"metrics log not written ({exc}); retrying with the next records", stacklevel=2)
    sink.flush = flush  # type: ignore[attr-defined]
    sink.finish = flush  # type: ignore[attr-defined]
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
