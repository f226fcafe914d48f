"""Load a flow through Metaflow's own CLI and print, as JSON, what each step would be launched
with: its decorators, the @kubernetes settings, whether Metaflow's graph treats it as a
@parallel gang, the `kubernetes step` command options Metaflow's runtime would build and, when
the `kubernetes` client is importable (the project's `k8s` extra), the Job or JobSet manifest
Metaflow's own builder (plugins/kubernetes/kubernetes.py) makes from them.

    python tests/_compute_probe.py FLOW_FILE NUM_PARALLEL [METAFLOW TOP-LEVEL OPTIONS...]
    python tests/_compute_probe.py FLOW_FILE argo [METAFLOW TOP-LEVEL OPTIONS...]

NUM_PARALLEL is what the step before a @parallel step passes to self.next (0: none). `argo`
instead runs `argo-workflows create --only-json` (needs the `kubernetes` client) with the code
package upload replaced by a fixed URL, and prints the WorkflowTemplate.

Offline: the datastore is declared as gs (what @kubernetes insists on) but never touched,
because the probe stops after Metaflow has initialised the step decorators (it wraps
`metaflow.decorators._init_step_decorators`, which the CLI calls, and exits from there).
"""

import json
import os
import runpy
import sys
import tempfile
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


def _manifest(flow, step_name: str, kube, num_parallel: int, environment, flow_datastore) -> dict | None:
    """The Kubernetes object `kubernetes step` would submit for this task, rendered offline by
    Metaflow's builder (the same arguments kubernetes_cli.step passes it), or None without the
    `kubernetes` client."""
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        return None
    from kubernetes import client
    from metaflow.plugins.kubernetes.kubernetes import Kubernetes
    a = kube.attributes
    args = dict(  # what kubernetes_cli.step hands Kubernetes.launch_job (secrets: a list, as click gives it)
        flow_name=flow.name, run_id="1", step_name=step_name, task_id="2", attempt="0", user="tester",
        code_package_metadata=json.dumps({"version": 1, "mfcontent_version": 1}), code_package_sha="0" * 40,
        code_package_url="gs://probe/mf/pkg", code_package_ds="gs", step_cli=f"python flow.py step {step_name}",
        docker_image=a["image"], docker_image_pull_policy=a["image_pull_policy"],
        image_pull_secrets=a["image_pull_secrets"], service_account=a["service_account"],
        secrets=list(a["secrets"] or []), node_selector=a["node_selector"], namespace=a["namespace"],
        cpu=a["cpu"], gpu=a["gpu"], gpu_vendor=a["gpu_vendor"], disk=a["disk"], memory=a["memory"],
        use_tmpfs=a["use_tmpfs"], tmpfs_tempdir=a["tmpfs_tempdir"], tmpfs_size=a["tmpfs_size"],
        tmpfs_path=a["tmpfs_path"], run_time_limit=kube.run_time_limit, env={},
        persistent_volume_claims=a["persistent_volume_claims"], tolerations=a["tolerations"], labels=a["labels"],
        annotations=a["annotations"], shared_memory=a["shared_memory"], port=a["port"], qos=a["qos"],
        extended_resources=a["extended_resources"], security_context=a["security_context"])
    k8s = Kubernetes(datastore=flow_datastore, metadata=None, environment=environment)
    if num_parallel:
        jobset = k8s.create_jobset(num_parallel=num_parallel, **args)
        return client.ApiClient().sanitize_for_serialization(jobset.dump())
    job = k8s.create_job_object(name_pattern="t-probe-", **args).create()
    return client.ApiClient().sanitize_for_serialization(job._job)


def _dump(flow, graph, num_parallel: int, environment, flow_datastore) -> None:
    out = {}
    for node in graph:
        decos = getattr(flow, node.name).decorators
        kube = next((d for d in decos if d.name == "kubernetes"), None)
        width = num_parallel if node.parallel_step else 0
        out[node.name] = {
            "decorators": [d.name for d in decos],
            "parallel": node.parallel_step,
            "kubernetes": None if kube is None else {k: kube.attributes[k] for k in (
                "node_selector", "extended_resources", "tolerations", "image", "cpu", "memory", "disk", "gpu",
                "gpu_vendor", "shared_memory")},
            "launch": _launch_options(node.name, decos, width) if kube is not None else None,
            "manifest": _manifest(flow, node.name, kube, width, environment, flow_datastore)
            if kube is not None else None,
        }
    print("PROBE " + json.dumps(out, default=str))


# Metaflow's builder loads a kubeconfig before building anything; this one names no real
# cluster and nothing here ever connects to it.
_OFFLINE_KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: offline, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: offline, user: {token: offline}}]
contexts: [{name: offline, context: {cluster: offline, user: offline}}]
current-context: offline
"""


def main() -> None:
    flow_file = sys.argv[1]
    path = os.path.join(tempfile.mkdtemp(prefix="probe-kube-"), "config")
    with open(path, "w") as f:
        f.write(_OFFLINE_KUBECONFIG)
    os.environ["KUBECONFIG"] = path
    top = [flow_file, "--quiet", "--metadata", "local", "--datastore", "gs", "--datastore-root", "gs://probe/mf",
           *sys.argv[3:]]
    if sys.argv[2] == "argo":
        from metaflow.datastore.flow_datastore import FlowDataStore
        # the one step of `create --only-json` that would reach GCS: uploading the code package
        FlowDataStore.save_data = lambda self, blobs, len_hint=0: [("gs://probe/mf/pkg", "0" * 40) for _ in blobs]
        sys.argv = top + ["argo-workflows", "create", "--only-json"]
        runpy.run_path(flow_file, run_name="__main__")
        return
    num_parallel = int(sys.argv[2])
    from metaflow import decorators

    original = decorators._init_step_decorators

    def probe(flow, graph, environment, flow_datastore, *args, **kwargs):
        original(flow, graph, environment, flow_datastore, *args, **kwargs)
        _dump(flow, flow._graph, num_parallel, environment, flow_datastore)
        sys.stdout.flush()
        os._exit(0)

    decorators._init_step_decorators = probe
    sys.argv = top + ["check", "--no-pylint"]
    runpy.run_path(flow_file, run_name="__main__")


if __name__ == "__main__":
    main()
