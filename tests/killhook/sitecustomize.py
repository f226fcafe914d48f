"""Test-only crash injection: with KILL_MODE set, the process SIGKILLs itself at a chosen moment.

Put this directory on PYTHONPATH (Python imports `sitecustomize` at start-up) to crash a
`python -m steps.pretrain` or a Metaflow task deterministically. Everything else is the real code.

KILL_MODE=batch:N  -> die while assembling the N-th optimizer step's batch (mid-training)
KILL_MODE=save:N   -> die right after the async save of step N was started (write in flight)
KILL_MODE=manifest -> die as the stage is about to write its manifest: its final checkpoint has
                      landed (the loop waits for it), nothing after it has happened (as when the
                      card or an upload fails after training)
KILL_STAGE=NAME    -> only in a process whose command line names NAME (a Metaflow task of that step)
KILL_NODE=N        -> only in node N of a @parallel step (a worker, N >= 1: Metaflow starts it with
                      MF_PARALLEL_NODE_INDEX set; node 0, the control task, learns its index later)
"""

import os

import sys

if (os.environ.get("KILL_MODE") and os.environ.get("KILL_STAGE", sys.argv[0]) in sys.argv
        and os.environ.get("KILL_NODE") in (None, os.environ.get("MF_PARALLEL_NODE_INDEX"))):
    import signal

    mode, _, arg = os.environ["KILL_MODE"].partition(":")

    def _die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    from flaxchat import checkpoint, manifest
    from flaxchat.train import loop

    if mode == "save":
        _real_save = checkpoint.CheckpointStore.save

        def _save(self, step, state, meta):
            _real_save(self, step, state, meta)
            if step == int(arg):
                _die()

        checkpoint.CheckpointStore.save = _save
    elif mode == "batch":
        _real_global = loop._global
        _calls = {"n": 0}

        def _global(batch, mesh):
            _calls["n"] += 1
            if _calls["n"] == int(arg):
                _die()
            return _real_global(batch, mesh)

        loop._global = _global
    elif mode == "manifest":
        # patched before any stage module imports it by name
        manifest.write_manifest = lambda _manifest: _die()
    else:
        raise SystemExit(f"unknown KILL_MODE {mode!r}")
