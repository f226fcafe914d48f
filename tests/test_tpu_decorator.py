"""@tpu and the config-driven stage placement, offline, through Metaflow itself.

Each case loads a flow with Metaflow's CLI in a subprocess (tests/_compute_probe.py), lets
Metaflow attach and initialise the step decorators against a gs datastore that is never
touched, and reads back per step: the decorators, Metaflow's graph (@parallel or not), the
@kubernetes settings and the `kubernetes step` options Metaflow's runtime would launch the
pod (or, with num-parallel, the JobSet of one control + N-1 workers) with. With the
`kubernetes` client installed (the `k8s` extra), the last tests also render the Job / JobSet
manifests with Metaflow's own builder and the Argo WorkflowTemplate (`argo-workflows create
--only-json`); without it they skip.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "flows" / "full_pipeline.py"
GANG = ROOT / "tests" / "flows" / "tpu_gang_flow.py"
SINGLE = ROOT / "tests" / "flows" / "tpu_single_flow.py"
DEFAULT_IMAGE = "reg/flaxchat:cpu"
TPU_TOLERATION = {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}


def probe(flow: Path, num_parallel: int = 0, *args: str) -> tuple[int, dict | None, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "METAFLOW_USER": "tester",
           # only this checkout's metaflow_extensions (another checkout on sys.path would clash)
           "METAFLOW_EXTENSIONS_SEARCH_DIRS": str(ROOT),
           "METAFLOW_KUBERNETES_CONTAINER_IMAGE": DEFAULT_IMAGE}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_compute_probe.py"), str(flow), str(num_parallel),
                           *args], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    return proc.returncode, json.loads(line[6:]) if line else None, proc.stdout + proc.stderr


def pipeline_with(tmp_path, compute: dict) -> tuple[int, dict | None, str]:
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump({"compute": compute}))
    return probe(PIPELINE, 0, "--config", "config", str(path))


def test_default_config_leaves_every_pipeline_step_local():
    rc, steps, out = probe(PIPELINE)
    assert rc == 0, out
    training = {"pretrain", "sft", "grpo"}
    assert set(steps) == {"start", "tokenizer", "eval", "export", "end", "launch_pretrain", "launch_sft", "launch_grpo",
                          *training, *(f"{t}_join" for t in training)}
    for name, s in steps.items():
        assert s["kubernetes"] is None and not {"tpu", "kubernetes"} & set(s["decorators"]), name
        # the training stages are @parallel gangs of mesh.num_parallel processes (1 by default)
        assert s["parallel"] == (name in training) and ("parallel" in s["decorators"]) == (name in training), name


def test_compute_section_places_each_stage(tmp_path):
    rc, steps, out = pipeline_with(tmp_path, {
        "tpu_image": "reg/flaxchat:tpu",
        "pretrain": {"kind": "tpu", "type": "v6e", "topology": "2x4"},
        "eval": {"kind": "tpu", "type": "v5litepod", "topology": "2x2", "spot": True, "image": "reg/eval:tpu"},
        "sft": {"kind": "gpu", "type": "h100", "count": 8}})
    assert rc == 0, out
    pre = steps["pretrain"]
    # a one-host slice: the flow's own @parallel (mesh.num_parallel=1) stays, @tpu is no gang
    assert pre["decorators"][-2:] == ["tpu", "kubernetes"] and pre["decorators"].count("parallel") == 1
    assert pre["kubernetes"]["node_selector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                                  "cloud.google.com/gke-tpu-topology": "2x4"}
    assert pre["kubernetes"]["extended_resources"] == {"google.com/tpu": "8"}      # one 8-chip host
    assert pre["kubernetes"]["tolerations"] == [TPU_TOLERATION]
    assert pre["kubernetes"]["gpu"] is None
    launch = pre["launch"]
    assert launch["commands"] == ["kubernetes", "step"]
    assert launch["options"]["image"] == "reg/flaxchat:tpu"
    assert launch["options"]["node_selector"] == ["cloud.google.com/gke-tpu-accelerator=tpu-v6e-slice",
                                                  "cloud.google.com/gke-tpu-topology=2x4"]
    assert json.loads(launch["options"]["extended_resources"]) == {"google.com/tpu": "8"}
    assert json.loads(launch["options"]["tolerations"]) == [TPU_TOLERATION]
    assert "num-parallel" not in launch["options"]                                 # a plain Job, one pod

    ev = steps["eval"]["kubernetes"]
    assert ev["node_selector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
    assert ev["node_selector"]["cloud.google.com/gke-spot"] == "true"
    assert (ev["image"], ev["extended_resources"]) == ("reg/eval:tpu", {"google.com/tpu": "4"})

    sft = steps["sft"]
    assert "tpu" not in sft["decorators"]
    assert (sft["kubernetes"]["gpu"], sft["kubernetes"]["gpu_vendor"]) == (8, "nvidia")
    assert sft["kubernetes"]["node_selector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert sft["kubernetes"]["image"] == DEFAULT_IMAGE           # no gpu_image: Metaflow's configured image
    assert sft["launch"]["options"]["gpu"] == 8

    for name in ("start", "tokenizer", "grpo", "export", "end"):
        assert steps[name]["kubernetes"] is None, name


def test_with_kubernetes_sends_the_rest_to_cpu_pods_and_the_config_wins_for_its_stages(tmp_path):
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump({"compute": {"pretrain": {"kind": "tpu", "type": "v6e", "topology": "2x2"},
                                                "sft": {"kind": "gpu", "type": "l4", "count": 1}}}))
    rc, steps, out = probe(PIPELINE, 0, "--config", "config", str(path), "--with", "kubernetes:cpu=4,memory=16384")
    assert rc == 0, out
    for name in ("start", "tokenizer", "grpo", "eval", "export", "end"):
        assert (steps[name]["kubernetes"]["cpu"], steps[name]["kubernetes"]["node_selector"]) == (4, None), name
    pre = steps["pretrain"]
    assert pre["decorators"].count("kubernetes") == 1            # @tpu completed the --with one
    assert pre["kubernetes"]["node_selector"]["cloud.google.com/gke-tpu-topology"] == "2x2"
    assert (pre["kubernetes"]["cpu"], pre["kubernetes"]["extended_resources"]) == ("32", {"google.com/tpu": "4"})
    assert (steps["sft"]["kubernetes"]["gpu"], steps["sft"]["kubernetes"]["cpu"]) == (1, 4)


def test_multi_host_gang_is_a_parallel_step_with_one_pod_per_host():
    rc, steps, out = probe(GANG, 4)
    assert rc == 0, out
    train = steps["train"]
    assert train["parallel"]                      # Metaflow's graph sees @tpu as the @parallel gang
    assert train["kubernetes"]["node_selector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                                    "cloud.google.com/gke-tpu-topology": "4x4"}
    assert train["kubernetes"]["extended_resources"] == {"google.com/tpu": "4"}    # chips per host
    assert train["kubernetes"]["image"] == "registry/flaxchat:tpu"
    # num-parallel makes `kubernetes step` build a JobSet: 1 control + 3 worker replicas
    assert train["launch"]["options"]["num-parallel"] == "4"
    assert train["launch"]["commands"] == ["kubernetes", "step"]
    assert all(steps[s]["kubernetes"] is None and not steps[s]["parallel"] for s in ("start", "join", "end"))


def test_gang_called_with_the_wrong_width_is_refused():
    rc, _, out = probe(GANG, 2)
    assert rc != 0
    assert "v5e 4x4 slice has 4 hosts but the step was called with num_parallel=2; use num_parallel=4" in out


def test_multi_host_stage_is_the_pipelines_gang(tmp_path):
    """The training steps are gang-shaped (@parallel, a join after): a multi-host slice's @tpu takes the
    place of the flow's own @parallel, one parallel decorator on the step."""
    rc, steps, out = pipeline_with(tmp_path, {"pretrain": {"kind": "tpu", "type": "v5e", "topology": "4x4"}})
    assert rc == 0, out
    pre = steps["pretrain"]
    assert pre["parallel"] and "parallel" not in pre["decorators"] and pre["decorators"][-2:] == ["tpu", "kubernetes"]
    assert steps["sft"]["parallel"] and "parallel" in steps["sft"]["decorators"]


@pytest.mark.parametrize("compute, needle", [
    ({"pretrain": {"kind": "tpu", "type": "v9", "topology": "2x2"}},
     "compute.pretrain: unknown TPU type 'v9'; choose one of v4, v5e, v5p, v6e"),
    ({"sft": {"kind": "gpu", "type": "h100", "count": 3}}, "compute.sft: GPU count 3"),
    ({"pretrian": {"kind": "tpu"}}, "did you mean 'compute.pretrain'"),
])
def test_bad_compute_in_the_yaml_stops_the_flow_with_one_line(tmp_path, compute, needle):
    rc, steps, out = pipeline_with(tmp_path, compute)
    assert rc != 0 and steps is None
    assert needle in out
    assert "Traceback" not in out


def test_tpu_completes_a_kubernetes_decorator_the_step_already_has():
    rc, steps, out = probe(SINGLE)
    assert rc == 0, out
    kube = steps["start"]["kubernetes"]
    assert steps["start"]["decorators"].count("kubernetes") == 1
    assert kube["node_selector"] == {"team": "ml", "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                     "cloud.google.com/gke-tpu-topology": "2x2"}
    assert kube["tolerations"] == [{"key": "team", "operator": "Exists"}, TPU_TOLERATION]
    assert (kube["cpu"], kube["memory"]) == ("64", "131072")       # the larger of the two
    # a topology from a Config value (config_expr) works too
    assert steps["train"]["kubernetes"]["node_selector"]["cloud.google.com/gke-tpu-topology"] == "2x2"


def test_tpu_topology_from_config_is_checked(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"topology": "3x3"}))
    rc, _, out = probe(SINGLE, 0, "--config", "cfg", str(cfg))
    assert rc != 0
    assert "step train: TPU v6e topology '3x3' is not offered; choose one of 1x1, 2x2, 2x4" in out


def test_every_host_of_a_gang_gets_its_tpu_worker_environment(monkeypatch):
    """The decorator's hook that runs before the step body on each of 4 hosts (no TPU needed)."""
    from metaflow.plugins import STEP_DECORATORS   # the extension as Metaflow loaded it
    TpuDecorator = next(d for d in STEP_DECORATORS if d.name == "tpu")
    assert not TpuDecorator(attributes={"type": "v5e", "topology": "2x4"}).IS_PARALLEL
    deco = TpuDecorator(attributes={"type": "v5e", "topology": "4x4"})
    assert deco.IS_PARALLEL
    # a pod started with the wrong gang width (e.g. under Argo) stops before any JAX work
    flow = SimpleNamespace(_parallel_ubf_iter=SimpleNamespace(num_parallel=2))
    with pytest.raises(Exception, match="slice has 4 hosts but the step was called with num_parallel=2"):
        deco.task_pre_step("train", None, None, "1", "2", flow, None, 0, 0, None, [])
    master = "fl-1-control-0-0.fl-1.flaxchat.svc.cluster.local"
    # the hook writes the TPU worker variables into os.environ: give it a copy, so none of them leaks
    # into later tests (a leaked TPU_WORKER_HOSTNAMES makes flaxchat.distributed expect a cluster)
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for node in range(4):
        monkeypatch.setenv("MF_MASTER_ADDR", master)
        monkeypatch.setenv("MF_PARALLEL_NUM_NODES", "4")
        monkeypatch.setenv("MF_PARALLEL_NODE_INDEX", str(node))
        monkeypatch.delenv("TPU_WORKER_ID", raising=False)
        deco.setup_distributed_env(flow=None)
        assert os.environ["TPU_WORKER_ID"] == str(node)
        hosts = os.environ["TPU_WORKER_HOSTNAMES"].split(",")
        assert hosts[0] == master and hosts[3] == "fl-1-worker-2-0.fl-1.flaxchat.svc.cluster.local"


def test_every_terraform_tpu_pool_is_a_slice_tpu_schedules_onto():
    """@tpu's table against infra/terraform's pools: for each pool (default and example), the
    pod @tpu builds selects that pool's labels, requests its chips per host, and a gang is as
    wide as the pool has hosts."""
    from flaxchat.compute import tpu_kubernetes_attributes, tpu_slice
    from test_infra import all_tpu_pools, terraform, tpu_chips_per_host
    labels = terraform()["locals"]["tpu_accelerator_labels"]
    generation = {"ct5lp": "v5e", "ct5p": "v5p", "ct6e": "v6e"}
    pools = all_tpu_pools()
    assert pools
    for name, pool in pools.items():
        family = pool["machine_type"].split("-")[0]
        sl = tpu_slice(generation[family], pool["topology"])
        attrs = tpu_kubernetes_attributes(sl)
        assert attrs["node_selector"] == {"cloud.google.com/gke-tpu-accelerator": labels[family],
                                          "cloud.google.com/gke-tpu-topology": pool["topology"]}, name
        assert attrs["extended_resources"] == {"google.com/tpu": str(tpu_chips_per_host(pool["machine_type"]))}, name
        assert sl.hosts == pool["hosts"], name


def test_the_step_image_carries_the_extension():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert "COPY metaflow_extensions ./metaflow_extensions" in dockerfile
    assert (ROOT / "metaflow_extensions" / "flaxchat" / "plugins" / "mfextinit_flaxchat.py").is_file()


# ----------------------------------------------------------------------------- rendered manifests
# Metaflow's own Job/JobSet builder needs the `kubernetes` client (the project's `k8s` extra).

def _pod(replicated_job: dict) -> dict:
    return replicated_job["template"]["spec"]["template"]["spec"]


def test_rendered_jobset_for_a_four_host_slice():
    pytest.importorskip("kubernetes")
    from flaxchat.compute import tpu_worker_env
    rc, steps, out = probe(GANG, 4)
    assert rc == 0, out
    jobset = steps["train"]["manifest"]
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    name = jobset["metadata"]["name"]
    assert [(rj["name"], rj["replicas"]) for rj in jobset["spec"]["replicatedJobs"]] == [("control", 1), ("worker", 3)]
    for rj in jobset["spec"]["replicatedJobs"]:
        pod = _pod(rj)
        container = pod["containers"][0]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                       "cloud.google.com/gke-tpu-topology": "4x4"}
        assert pod["tolerations"] == [TPU_TOLERATION]
        assert container["resources"]["limits"] == {"google.com/tpu": "4"}
        assert container["resources"]["requests"]["google.com/tpu"] == "4"
        assert container["image"] == "registry/flaxchat:tpu"
        assert pod["subdomain"] == name
    env = {e["name"]: e.get("value") for e in _pod(jobset["spec"]["replicatedJobs"][0])["containers"][0]["env"]}
    assert env["MF_WORLD_SIZE"] == "4"
    # the host names @tpu hands libtpu are the JobSet's pod DNS names, control first
    master = env["MF_MASTER_ADDR"]
    tpu = tpu_worker_env({"MF_MASTER_ADDR": master, "MF_PARALLEL_NUM_NODES": "4", "MF_PARALLEL_NODE_INDEX": "2"})
    domain = master.split(".", 1)[1]
    assert domain.startswith(f"{name}.")
    assert tpu["TPU_WORKER_HOSTNAMES"].split(",") == [f"{name}-control-0-0.{domain}"] + [
        f"{name}-{rj}-{i}-0.{domain}" for rj, i in (("worker", 0), ("worker", 1), ("worker", 2))]


def test_rendered_jobs_for_pipeline_stages(tmp_path):
    pytest.importorskip("kubernetes")
    rc, steps, out = pipeline_with(tmp_path, {"tpu_image": "reg/flaxchat:tpu",
                                              "pretrain": {"kind": "tpu", "type": "v6e", "topology": "2x4"},
                                              "sft": {"kind": "gpu", "type": "h100", "count": 8}})
    assert rc == 0, out
    job = steps["pretrain"]["manifest"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x4"}
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": "8"}
    assert pod["containers"][0]["image"] == "reg/flaxchat:tpu"
    assert pod["tolerations"] == [TPU_TOLERATION]
    gpu_pod = steps["sft"]["manifest"]["spec"]["template"]["spec"]
    assert gpu_pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert gpu_pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert steps["tokenizer"]["manifest"] is None                    # local: no pod at all


def _argo(flow: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "METAFLOW_USER": "tester", "METAFLOW_EXTENSIONS_SEARCH_DIRS": str(ROOT),
           "METAFLOW_KUBERNETES_CONTAINER_IMAGE": DEFAULT_IMAGE}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_compute_probe.py"), str(flow), "argo", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {t["name"]: t for t in json.loads(proc.stdout)["spec"]["templates"]}


def _jobset(template: dict) -> dict:
    """The JobSet manifest of an Argo resource template (a @parallel step), by replicated job name."""
    # Argo fills `{{...}}` in before the manifest is parsed; quote the bare ones to read it here
    text = re.sub(r": (\{\{[^}]*\}\})\s*$", r": '\1'", template["resource"]["manifest"], flags=re.M)
    manifest = yaml.safe_load(text)
    assert manifest["kind"] == "JobSet"
    return {rj["name"]: rj for rj in manifest["spec"]["replicatedJobs"]}


def test_argo_workflow_template_runs_a_tpu_stage_on_its_slice(tmp_path):
    """The training stages are @parallel steps (mesh.num_parallel processes), so Argo runs each as a
    JobSet; on a one-host slice every pod of it gets the slice's selectors, chips and image."""
    pytest.importorskip("kubernetes")
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump({"compute": {"tpu_image": "reg/flaxchat:tpu",
                                                "pretrain": {"kind": "tpu", "type": "v5e", "topology": "2x2"}}}))
    templates = _argo(PIPELINE, "--config", "config", str(path))
    for rj in _jobset(templates["pretrain"]).values():
        pod = _pod(rj)
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                       "cloud.google.com/gke-tpu-topology": "2x2"}
        assert pod["tolerations"] == [TPU_TOLERATION]
        assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": "4"}
        assert pod["containers"][0]["image"] == "reg/flaxchat:tpu"
    # Argo puts every step on Kubernetes; the local stages get Metaflow's defaults, no accelerator
    for rj in _jobset(templates["sft"]).values():
        pod = _pod(rj)
        assert "google.com/tpu" not in pod["containers"][0]["resources"].get("limits", {})
        assert not pod.get("nodeSelector")
    assert "google.com/tpu" not in templates["eval"]["container"]["resources"]["limits"]


def test_argo_workflow_template_runs_a_gang_as_a_jobset():
    pytest.importorskip("kubernetes")
    train = _argo(GANG)["train"]
    # Argo fills `{{...}}` in before the manifest is parsed; quote the bare ones to read it here
    text = re.sub(r": (\{\{[^}]*\}\})\s*$", r": '\1'", train["resource"]["manifest"], flags=re.M)
    manifest = yaml.safe_load(text)
    assert manifest["kind"] == "JobSet"
    jobs = {rj["name"]: rj for rj in manifest["spec"]["replicatedJobs"]}
    assert jobs["control"]["replicas"] == 1
    assert "workerCount" in jobs["worker"]["replicas"]        # num_parallel - 1, set when the run starts
    for rj in jobs.values():
        pod = _pod(rj)
        assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"
        assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": "4"}
        assert pod["tolerations"] == [TPU_TOLERATION]
