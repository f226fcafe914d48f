"""Run `steps.pretrain` and SIGKILL ourselves at a chosen moment (test helper, not a test).

KILL_MODE=batch:N  -> die while assembling the N-th optimizer step's batch (mid-training)
KILL_MODE=save:N   -> die right after the async save of step N was started (write in flight)
Everything else is the real stage; only the moment of death is chosen here.
"""

import os
import runpy
import signal
import sys

from flaxchat import checkpoint
from flaxchat.train import loop

mode, _, arg = os.environ["KILL_MODE"].partition(":")
target = int(arg)


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if mode == "save":
    real_save = checkpoint.CheckpointStore.save

    def save(self, step, state, meta):
        real_save(self, step, state, meta)
        if step == target:
            die()

    checkpoint.CheckpointStore.save = save
elif mode == "batch":
    real_global = loop._global
    calls = {"n": 0}

    def global_batch(batch, mesh):
        calls["n"] += 1
        if calls["n"] == target:
            die()
        return real_global(batch, mesh)

    loop._global = global_batch
else:
    raise SystemExit(f"unknown KILL_MODE {mode!r}")

sys.argv = ["steps.pretrain", *sys.argv[1:]]
runpy.run_module("steps.pretrain", run_name="__main__")
