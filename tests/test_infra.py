"""infra/ must agree with itself: terraform, Kubernetes manifests, the Metaflow config
template, the Dockerfile and the README name the same namespace, service account, bucket
layout, ports, node pools and images.

Offline and fast: files are parsed (pyyaml, python-hcl2), and Metaflow itself is asked how
it reads its config, `--with` specs and code-package download, so a renamed config key or
a changed bootstrap command in a Metaflow upgrade fails here instead of on the cluster.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import hcl2
import yaml
from hcl2 import SerializationOptions

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
TF_DIR = INFRA / "terraform"
USER_PLACEHOLDERS = {"PROJECT_ID", "REGION", "BUCKET"}
DB_ENV_KEYS = {f"MF_METADATA_DB_{k}" for k in ("HOST", "PORT", "USER", "PSWD", "NAME")}
TPU_ACCEL, TPU_TOPO = "cloud.google.com/gke-tpu-accelerator", "cloud.google.com/gke-tpu-topology"

# ----------------------------------------------------------------------------- loaders


def _hcl(path: Path) -> dict:
    opts = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    with open(path) as f:
        return hcl2.load(f, serialization_options=opts)


@cache
def terraform() -> dict:
    """All *.tf files merged: {'variable': {name: block}, 'resource': {(type, name): block},
    'output': {name: block}, 'locals': {name: value}}."""
    merged: dict = {"variable": {}, "resource": {}, "output": {}, "locals": {}}
    for path in sorted(TF_DIR.glob("*.tf")):
        doc = _hcl(path)
        for block in doc.get("variable", []):
            merged["variable"].update(block)
        for block in doc.get("output", []):
            merged["output"].update(block)
        for block in doc.get("locals", []):
            merged["locals"].update(block)
        for block in doc.get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    merged["resource"][(rtype, name)] = body
    return merged


def tf_default(name: str):
    return terraform()["variable"][name]["default"]


def tf_resource(rtype: str, name: str) -> dict:
    return terraform()["resource"][(rtype, name)]


def resolve_vars(expr: str) -> str:
    """Substitute ${var.X} with X's default (a variable without one stays as it is)."""
    def sub(m: re.Match) -> str:
        block = terraform()["variable"][m.group(1)]
        return str(block["default"]) if "default" in block else m.group(0)
    return re.sub(r"\$\{var\.(\w+)\}", sub, expr)


@cache
def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def one(kind: str, name: str) -> dict:
    found = [d for d in k8s(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def containers(deployment: dict) -> list[dict]:
    spec = pod_spec(deployment)
    return spec["containers"] + spec.get("initContainers", [])


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@cache
def config() -> dict[str, str]:
    return json.loads((INFRA / "metaflow" / "config.json.template").read_text())


@cache
def readme() -> str:
    return (INFRA / "README.md").read_text()


def render(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], text)


def readme_with_specs() -> list[dict]:
    """Every `--with kubernetes:...` spec in the README, parsed by Metaflow's own parser."""
    from metaflow.plugins.kubernetes.kube_utils import parse_kube_keyvalue_list
    from metaflow.plugins.kubernetes.kubernetes_decorator import KubernetesDecorator
    specs = []
    for raw in re.findall(r"--with '?kubernetes:([^'\n]+)'?", readme()):
        _, attrs = KubernetesDecorator.extract_args_kwargs_from_decorator_spec(raw)
        if isinstance(attrs.get("node_selector"), str):
            attrs["node_selector"] = parse_kube_keyvalue_list(attrs["node_selector"].split(","))
        specs.append(attrs)
    return specs


def tpu_chips_per_host(machine_type: str) -> int:
    return int(machine_type.split("-")[2].rstrip("t"))


def topology_chips(topology: str) -> int:
    chips = 1
    for dim in topology.split("x"):
        chips *= int(dim)
    return chips


def tpu_selector(pool: dict) -> tuple[str, str]:
    family = pool["machine_type"].split("-")[0]
    return terraform()["locals"]["tpu_accelerator_labels"][family], pool["topology"]


# ----------------------------------------------------------------------------- Kubernetes manifests


def test_manifests_declare_the_service_and_ui_with_pinned_images():
    kinds = sorted(d["kind"] for d in k8s_docs())
    assert kinds == ["Deployment", "Deployment", "Namespace", "Service", "Service", "ServiceAccount"]
    namespace = one("Namespace", config()["METAFLOW_KUBERNETES_NAMESPACE"])["metadata"]["name"]
    for doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    for deployment in k8s("Deployment"):
        for container in containers(deployment):
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            assert container.get("command"), f"{container['name']}: the image has no useful default command"


def test_every_service_targets_a_port_its_deployment_exposes():
    for service in k8s("Service"):
        selector = service["spec"]["selector"]
        matches = [d for d in k8s("Deployment")
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"service {service['metadata']['name']} selects {len(matches)} deployments"
        deployment = matches[0]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= selector.items()
        exposed = [p for c in pod_spec(deployment)["containers"] for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            hit = [p for p in exposed if target in (p.get("name"), p["containerPort"])]
            assert hit, f"{service['metadata']['name']}: targetPort {target} is not a container port"
            assert hit[0]["containerPort"] == port["port"], "README port-forwards assume port == containerPort"


def test_one_service_account_everywhere():
    ksa = one("ServiceAccount", config()["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"])
    namespace = config()["METAFLOW_KUBERNETES_NAMESPACE"]
    assert ksa["metadata"]["namespace"] == namespace
    for deployment in k8s("Deployment"):
        assert pod_spec(deployment)["serviceAccountName"] == ksa["metadata"]["name"]
    assert (tf_default("k8s_namespace"), tf_default("k8s_service_account")) == (namespace, ksa["metadata"]["name"])
    binding = tf_resource("google_service_account_iam_member", "runner_workload_identity")
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert resolve_vars(binding["member"]) == \
        f"serviceAccount:${{var.project_id}}.svc.id.goog[{namespace}/{ksa['metadata']['name']}]"
    assert binding["service_account_id"] == "${google_service_account.runner.name}"
    assert tf_resource("google_service_account", "runner")["account_id"] == "${var.runner_gsa_id}"
    assert ksa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == \
        f"{tf_default('runner_gsa_id')}@${{PROJECT_ID}}.iam.gserviceaccount.com"
    grant = tf_resource("google_storage_bucket_iam_member", "runner_objects")
    assert (grant["role"], grant["member"]) == \
        ("roles/storage.objectAdmin", "serviceAccount:${google_service_account.runner.email}")


def test_database_secret_is_the_one_the_readme_creates():
    refs = {src["secretRef"]["name"] for d in k8s("Deployment") for c in containers(d) for src in c.get("envFrom", [])}
    assert len(refs) == 1
    secret = refs.pop()
    command = re.search(rf"create secret generic {secret}((?:.*\\\n)*.*)", readme())
    assert command, f"README never creates the Secret {secret}"
    assert set(re.findall(r"--from-literal=(\w+)=", command.group(1))) == DB_ENV_KEYS
    for deployment in k8s("Deployment"):   # everything reading the DB gets the Secret
        for container in containers(deployment):
            assert container.get("envFrom"), f"{container['name']} has no database settings"


def test_service_and_ui_stay_on_the_cpu_pool():
    pool = tf_default("cpu_pool_name")
    assert tf_resource("google_container_node_pool", "cpu")["name"] == "${var.cpu_pool_name}"
    for deployment in k8s("Deployment"):
        assert pod_spec(deployment)["nodeSelector"] == {"cloud.google.com/gke-nodepool": pool}


def test_service_urls_and_port_forwards_agree():
    namespace = config()["METAFLOW_KUBERNETES_NAMESPACE"]
    svc = one("Service", "metaflow-service")
    port = svc["spec"]["ports"][0]["port"]
    internal = f"http://metaflow-service.{namespace}.svc.cluster.local:{port}/"
    assert config()["METAFLOW_SERVICE_INTERNAL_URL"] == internal
    assert config()["METAFLOW_SERVICE_URL"] == f"http://localhost:{port}/"
    ui = one("Deployment", "metaflow-ui")
    assert env_of(pod_spec(ui)["containers"][0])["METAFLOW_SERVICE_URL"] == internal
    assert f"port-forward svc/metaflow-service {port}:{port}" in readme()
    ui_port = one("Service", "metaflow-ui")["spec"]["ports"][0]["port"]
    assert f"port-forward svc/metaflow-ui {ui_port}:{ui_port}" in readme()
    assert f"http://localhost:{ui_port}" in readme()


# ----------------------------------------------------------------------------- Metaflow config


def test_config_keys_are_real_metaflow_settings():
    from metaflow import metaflow_config
    for key in config():
        assert key.startswith("METAFLOW_") and hasattr(metaflow_config, key[len("METAFLOW_"):]), \
            f"{key} is not a Metaflow config name"
    assert config()["METAFLOW_DEFAULT_DATASTORE"] == "gs"
    assert config()["METAFLOW_DEFAULT_METADATA"] == "service"


def test_metaflow_reads_the_rendered_config(tmp_path):
    values = {"PROJECT_ID": "proj-1", "REGION": "us-central1", "BUCKET": "bkt-1"}
    rendered = render((INFRA / "metaflow" / "config.json.template").read_text(), values)
    (tmp_path / "config_gke.json").write_text(rendered)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
    env.update(METAFLOW_HOME=str(tmp_path), METAFLOW_PROFILE="gke")
    probe = ("import json; from metaflow import metaflow_config as c; print(json.dumps({k: getattr(c, k) for k in "
             "['DEFAULT_DATASTORE','DATASTORE_SYSROOT_GS','CARD_GSROOT','DEFAULT_METADATA','SERVICE_INTERNAL_URL',"
             "'KUBERNETES_NAMESPACE','KUBERNETES_SERVICE_ACCOUNT','KUBERNETES_CONTAINER_IMAGE']}))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["DEFAULT_DATASTORE"] == "gs" and seen["DEFAULT_METADATA"] == "service"
    assert seen["DATASTORE_SYSROOT_GS"] == "gs://bkt-1/metaflow"
    assert seen["CARD_GSROOT"].startswith(seen["DATASTORE_SYSROOT_GS"] + "/")
    assert seen["KUBERNETES_CONTAINER_IMAGE"] == "us-central1-docker.pkg.dev/proj-1/flaxchat/flaxchat:cpu"
    assert (seen["KUBERNETES_NAMESPACE"], seen["KUBERNETES_SERVICE_ACCOUNT"]) == \
        (tf_default("k8s_namespace"), tf_default("k8s_service_account"))


def test_only_user_variables_are_left_to_fill_and_the_readme_fills_them():
    k8s_text = "".join(p.read_text() for p in (INFRA / "k8s").glob("*.yaml"))
    config_text = (INFRA / "metaflow" / "config.json.template").read_text()
    k8s_vars = set(re.findall(r"\$\{([A-Z_]+)\}", k8s_text))
    config_vars = set(re.findall(r"\$\{([A-Z_]+)\}", config_text))
    assert k8s_vars <= USER_PLACEHOLDERS and config_vars <= USER_PLACEHOLDERS
    renders = ((r"for f in infra/k8s/\*\.yaml; do envsubst '([^']*)' < \"\$f\"", k8s_vars),
               (r"envsubst '([^']*)' < infra/metaflow/config\.json\.template", config_vars))
    for pattern, needed in renders:
        m = re.search(pattern, readme())
        assert m, f"README never renders what {pattern} looks for"
        assert set(re.findall(r"\$\{(\w+)\}", m.group(1))) == needed
    for name in needed | k8s_vars:
        assert re.search(rf"export {name}=", readme()), f"README never sets {name}"


def test_bucket_variable_feeds_the_datastore_sysroot():
    assert tf_resource("google_storage_bucket", "artifacts")["name"] == "${var.bucket_name}"
    outputs = terraform()["output"]
    assert outputs["metaflow_datastore_sysroot"]["value"] == "gs://${google_storage_bucket.artifacts.name}/metaflow"
    assert outputs["bucket_name"]["value"] == "${google_storage_bucket.artifacts.name}"
    assert 'export BUCKET="$($TF output -raw bucket_name)"' in readme()
    sysroot = config()["METAFLOW_DATASTORE_SYSROOT_GS"]
    assert sysroot == "gs://${BUCKET}/metaflow"
    assert config()["METAFLOW_CARD_GSROOT"].startswith(sysroot + "/")
    ui = pod_spec(one("Deployment", "metaflow-ui"))["containers"][0]
    assert env_of(ui)["METAFLOW_DATASTORE_SYSROOT_GS"] == sysroot
    assert outputs["flaxchat_artifact_root"]["value"] == "gs://${google_storage_bucket.artifacts.name}/flaxchat"
    assert readme().count('--artifact-root "gs://$BUCKET/flaxchat"') >= 3


def test_bucket_is_uniform_unversioned_and_cleans_tmp():
    bucket = tf_resource("google_storage_bucket", "artifacts")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["versioning"][0]["enabled"] is False
    rules = [(r["condition"][0], r["action"][0]["type"]) for r in bucket["lifecycle_rule"]]
    assert ({"age": "${var.tmp_retention_days}", "matches_prefix": "${var.tmp_prefixes}"}, "Delete") in rules
    assert all(p.endswith("/") for p in tf_default("tmp_prefixes"))


def test_image_names_agree():
    repo = tf_resource("google_artifact_registry_repository", "images")
    assert repo["repository_id"] == "${var.image_repository_id}" and repo["format"] == "DOCKER"
    assert terraform()["output"]["image_repository"]["value"] == \
        "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
    expected = f"${{REGION}}-docker.pkg.dev/${{PROJECT_ID}}/{tf_default('image_repository_id')}/flaxchat:cpu"
    assert config()["METAFLOW_KUBERNETES_CONTAINER_IMAGE"] == expected
    assert '-t "$IMAGE_REPO/flaxchat:$accel"' in readme() and "for accel in cpu tpu gpu" in readme()
    for accel in ("tpu", "gpu"):
        assert f'METAFLOW_KUBERNETES_CONTAINER_IMAGE="$IMAGE_REPO/flaxchat:{accel}"' in readme()


# ----------------------------------------------------------------------------- node pools


def all_tpu_pools() -> dict[str, dict]:
    example = _hcl(TF_DIR / "example.tfvars")
    return {**tf_default("tpu_pools"), **example["tpu_pools"]}


def test_tpu_pools_shapes_add_up():
    labels = terraform()["locals"]["tpu_accelerator_labels"]
    assert labels == {"ct5lp": "tpu-v5-lite-podslice", "ct5p": "tpu-v5p-slice", "ct6e": "tpu-v6e-slice"}
    pools = all_tpu_pools()
    assert {(p["topology"], p["hosts"]) for p in tf_default("tpu_pools").values()} == {("2x2", 1), ("4x4", 4)}
    for name, pool in pools.items():
        assert pool["machine_type"].split("-")[0] in labels, name
        assert topology_chips(pool["topology"]) == pool["hosts"] * tpu_chips_per_host(pool["machine_type"]), name
    tpu = tf_resource("google_container_node_pool", "tpu")
    placement = tpu["dynamic"][0]["placement_policy"]
    assert placement["for_each"] == "${each.value.hosts > 1 ? [each.value.topology] : []}"
    assert placement["content"][0] == {"type": "COMPACT", "tpu_topology": "${placement_policy.value}"}
    assert tpu["autoscaling"][0]["min_node_count"] == 0   # accelerators scale from zero
    assert "spot" in tpu["node_config"][0] and tpu["node_config"][0]["workload_metadata_config"][0]["mode"] == "GKE_METADATA"


def test_readme_tpu_examples_select_a_real_pool_with_the_right_chip_count():
    by_selector = {tpu_selector(p): p for p in tf_default("tpu_pools").values()}
    used = set()
    for spec in readme_with_specs():
        selector = spec.get("node_selector") or {}
        if TPU_ACCEL not in selector:
            continue
        key = (selector[TPU_ACCEL], selector[TPU_TOPO])
        assert key in by_selector, f"README --with selects {key}, which no TPU pool provides"
        assert spec["extended_resources"] == {"google.com/tpu": str(tpu_chips_per_host(by_selector[key]["machine_type"]))}
        used.add(key)
    block = re.search(r"```python\n(.*?@parallel.*?)```", readme(), re.S).group(1)
    selector = ast.literal_eval(re.search(r"node_selector=(\{.*?\})", block, re.S).group(1))
    resources = ast.literal_eval(re.search(r"extended_resources=(\{.*?\})", block, re.S).group(1))
    key = (selector[TPU_ACCEL], selector[TPU_TOPO])
    pool = by_selector[key]
    assert pool["hosts"] > 1, "the @parallel example must use a multi-host pool"
    assert int(re.search(r"num_parallel=(\d+)", block).group(1)) == pool["hosts"]
    assert resources == {"google.com/tpu": str(tpu_chips_per_host(pool["machine_type"]))}
    used.add(key)
    assert used == set(by_selector), "every default TPU pool has a README example"


def test_readme_gpu_example_matches_the_gpu_pool():
    gpu = tf_resource("google_container_node_pool", "gpu")
    accelerator = gpu["node_config"][0]["guest_accelerator"][0]
    assert accelerator["gpu_driver_installation_config"][0]["gpu_driver_version"] == "${var.gpu_driver_version}"
    specs = [s for s in readme_with_specs() if "cloud.google.com/gke-accelerator" in (s.get("node_selector") or {})]
    assert specs, "README has no GPU example"
    for spec in specs:
        assert spec["node_selector"]["cloud.google.com/gke-accelerator"] == tf_default("gpu_accelerator_type")
        assert int(spec["gpu"]) == tf_default("gpu_accelerator_count")


def test_example_tfvars_sets_every_required_variable_and_nothing_unknown():
    declared = terraform()["variable"]
    example = _hcl(TF_DIR / "example.tfvars")
    required = {name for name, block in declared.items() if "default" not in block}
    assert required == {"project_id", "region", "zone", "bucket_name"}
    assert required <= example.keys()
    assert example.keys() <= declared.keys(), example.keys() - declared.keys()


# ----------------------------------------------------------------------------- Dockerfile


@cache
def dockerfile() -> str:
    return (INFRA / "docker" / "Dockerfile").read_text()


def test_dockerfile_installs_exactly_the_locked_environment():
    text = dockerfile()
    assert re.search(r"^FROM python:3\.12", text, re.M)
    syncs = re.findall(r"uv sync[^\n]*", text)
    assert syncs and all("--locked" in s and "--extra gcs" in s for s in syncs)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("google-cloud-storage") for d in extras["gcs"])
    for accel, package in (("tpu", "jax[tpu]"), ("gpu", "jax[cuda12]")):
        assert f'{accel}) extra="--extra {accel}"' in text
        assert any(d.startswith(package) for d in extras[accel])
    for package in ("flaxchat", "steps", "flows"):   # the flow imports flows.cards from the image
        assert f"COPY {package} ./{package}" in text and (ROOT / package).is_dir()


def test_dockerfile_provides_what_metaflow_runs_before_a_step():
    from metaflow.metaflow_environment import MetaflowEnvironment
    environment = MetaflowEnvironment(None)
    download = environment._get_download_code_package_cmd("gs://bucket/pkg", "gs").split()[0]
    assert f"command -v {download}" in dockerfile()
    install = environment._get_install_dependencies_cmd("gs")
    skip_var = re.search(r"\$(\w+)", install).group(1)
    assert re.search(rf"^\s*{skip_var}=1", dockerfile(), re.M), f"the image must set {skip_var}"
    assert re.search(r'ENV PATH="/opt/flaxchat/\.venv/bin:', dockerfile()), "`python` must be the uv env"
