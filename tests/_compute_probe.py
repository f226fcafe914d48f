"""Load a flow through Metaflow's own CLI and print, as JSON, what each step would be launched
with: its decorators, the @kubernetes settings, whether Metaflow's graph treats it as a
@parallel gang, and the `kubernetes step` command options Metaflow's runtime would build.

    python tests/_compute_probe.py FLOW_FILE NUM_PARALLEL [METAFLOW TOP-LEVEL OPTIONS...]

NUM_PARALLEL is what the step before a @parallel step passes to self.next (0: none).

Offline: the datastore is declared as gs (what @kubernetes insists on) but never touched,
because the probe stops after Metaflow has initialised the step decorators (it wraps
`metaflow.decorators._init_step_decorators`, which the CLI calls, and exits from there).
"""

import json
import os
import runpy
import sys
from types import SimpleNamespace


def _launch_options(step_name: str, decos: list, num_parallel: int) -> dict:
    """Ask the step's decorators for the command line of its control task, as Metaflow's
    runtime does (runtime_step_cli on every decorator), with a stand-in for its arguments."""
    from metaflow.unbounded_foreach import UBF_CONTROL
    cli_args = SimpleNamespace(commands=["step"], command_args=[], command_options={}, entrypoint=["python"],
                               task=SimpleNamespace(step=step_name,
                                                    ubf_iter=SimpleNamespace(num_parallel=num_parallel)))
    for deco in decos:
        deco.runtime_step_cli(cli_args, 0, 0, UBF_CONTROL if num_parallel else None)
    return {"commands": cli_args.commands, "options": cli_args.command_options}


def _dump(flow, graph, num_parallel: int) -> None:
    out = {}
    for node in graph:
        decos = getattr(flow, node.name).decorators
        kube = next((d for d in decos if d.name == "kubernetes"), None)
        out[node.name] = {
            "decorators": [d.name for d in decos],
            "parallel": node.parallel_step,
            "kubernetes": None if kube is None else {k: kube.attributes[k] for k in (
                "node_selector", "extended_resources", "tolerations", "image", "cpu", "memory", "disk", "gpu",
                "gpu_vendor", "shared_memory")},
            "launch": _launch_options(node.name, decos, num_parallel if node.parallel_step else 0)
            if kube is not None else None,
        }
    print("PROBE " + json.dumps(out, default=str))


def main() -> None:
    flow_file = sys.argv[1]
    num_parallel = int(sys.argv[2])
    from metaflow import decorators

    original = decorators._init_step_decorators

    def probe(flow, graph, *args, **kwargs):
        original(flow, graph, *args, **kwargs)
        _dump(flow, flow._graph, num_parallel)
        sys.stdout.flush()
        os._exit(0)

    decorators._init_step_decorators = probe
    sys.argv = [flow_file, "--quiet", "--metadata", "local", "--datastore", "gs", "--datastore-root", "gs://probe/mf",
                *sys.argv[3:], "check", "--no-pylint"]
    runpy.run_path(flow_file, run_name="__main__")


if __name__ == "__main__":
    main()
