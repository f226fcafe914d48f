"""Test helper: a stage CLI (`python -m steps.<stage>`) in ONE process that trains on exactly the
global batches of a P-process job, the reference a P-process flow run is compared with.

A P-process run differs from a one-process run in two ways, and this undoes both:
- the mesh: P processes x 1 CPU device; here one process gets P host devices, so the mesh, the
  sharding and the compiled program are the same (1 device would sum the batch in another order,
  which Muon turns into O(lr) differences within steps, see tests/test_distributed.py);
- the data: process p of P reads the row groups numbered p mod P and yields its B/P rows; here
  every `PackedLoader` the stage builds is P loaders, one per virtual process, whose rows are
  stacked in process order (process 0's rows are the first of the global batch, as in
  `make_global_batch`).

    python tests/_emulated_hosts.py 2 pretrain --input tokenizer=URI --out DIR --config overrides.yaml
"""

from __future__ import annotations

import importlib
import os
import sys

if __name__ == "__main__":
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        raise SystemExit("usage: _emulated_hosts.py PROCESSES STAGE [stage CLI arguments]")
    hosts = int(sys.argv[1])
    # before jax is imported: P host devices stand in for P processes of one device each
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={hosts}"


class EmulatedHosts:
    """P PackedLoaders (process 0..P-1 of P) whose batches are stacked row-wise in process order."""

    def __init__(self, real, hosts: int, *args, state=None, **kwargs):
        kwargs.pop("process_index", None)
        kwargs.pop("process_count", None)
        states = (state or {}).get("hosts") or [None] * hosts
        self.parts = [real(*args, process_index=p, process_count=hosts, state=s, **kwargs)
                      for p, s in zip(range(hosts), states)]

    def __iter__(self):
        import numpy as np
        for pieces in zip(*self.parts):
            yield tuple(np.concatenate(column) for column in zip(*pieces))

    def state_dict(self):
        return {"hosts": [p.state_dict() for p in self.parts]}

    def close(self):
        for p in self.parts:
            getattr(p, "close", lambda: None)()


def main() -> int:
    hosts, stage = int(sys.argv[1]), sys.argv[2]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    module = importlib.import_module(f"steps.{stage}")
    real = module.PackedLoader
    module.PackedLoader = lambda *args, **kwargs: EmulatedHosts(real, hosts, *args, **kwargs)
    from steps.common import main as stage_main
    return stage_main(stage, module.run, sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
