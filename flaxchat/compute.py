"""Where a pipeline stage runs: the TPU/GPU tables and the Kubernetes settings they imply.

Pure data and arithmetic, no Metaflow: the `@tpu` step decorator and the flow's per-stage
placement (metaflow_extensions/flaxchat/plugins/) call into this module, and so do the
config validation (flaxchat/config.py) and the tests.

A TPU slice is a type (v4, v5e, v5p, v6e) and a topology ("4x4", "2x2x2"). The topology
fixes the chip count; GKE puts up to 8 chips (v5e/v6e) or 4 chips (v4/v5p) on one host
(TPU VM), so a bigger slice spans several hosts that only work together: one pod per
host, gang-scheduled, each requesting `google.com/tpu: <chips per host>` and selecting the
slice's node pool through the `cloud.google.com/gke-tpu-accelerator` and
`cloud.google.com/gke-tpu-topology` labels.

A multi-host slice runs as Metaflow `@parallel` on Kubernetes (a JobSet: one control job,
hosts-1 worker jobs). GKE's TPU webhook injects `TPU_WORKER_ID`/`TPU_WORKER_HOSTNAMES`
(what libtpu needs to wire the slice's hosts together) only into an Indexed Job with
parallelism > 1, and a Metaflow JobSet runs every host as its own one-pod Job, so
`tpu_worker_env` derives them from what Metaflow does set (MF_MASTER_ADDR,
MF_PARALLEL_NUM_NODES, MF_PARALLEL_NODE_INDEX).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

STAGES = ("tokenizer", "pretrain", "sft", "grpo", "eval", "export")
KINDS = ("local", "tpu", "gpu")


class ComputeError(ValueError):
    """A bad compute setting; the message names the valid values."""


@dataclasses.dataclass(frozen=True)
class TpuType:
    name: str
    accelerator: str              # the GKE node label value cloud.google.com/gke-tpu-accelerator
    dims: int                     # 2 (v5e, v6e: AxB) or 3 (v4, v5p: AxBxC)
    host_chips: int               # chips per host in a multi-host slice (the -4t machine types)
    single_host_max: int          # the largest slice that fits one host (an -8t or -4t machine)
    max_chips: int
    topologies: tuple[str, ...] = ()   # 2D types: the exact list GKE offers


_TPU_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")

TPU_TYPES: dict[str, TpuType] = {
    # single host: ct5lp-hightpu-1t/4t/8t; multi-host: ct5lp-hightpu-4t (4 chips per VM)
    "v5e": TpuType("v5e", "tpu-v5-lite-podslice", 2, 4, 8, 256, _TPU_2D),
    # single host: ct6e-standard-1t/4t/8t; multi-host: ct6e-standard-4t
    "v6e": TpuType("v6e", "tpu-v6e-slice", 2, 4, 8, 256, _TPU_2D),
    # ct5p-hightpu-4t / ct4p-hightpu-4t: 4 chips per VM, 2x2x1 is the one single-host slice
    "v5p": TpuType("v5p", "tpu-v5p-slice", 3, 4, 4, 8960),
    "v4": TpuType("v4", "tpu-v4-podslice", 3, 4, 4, 4096),
}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5e": "v5e", "v6e": "v6e", "trillium": "v6e",
               "v5p": "v5p", "v4": "v4"}

# GKE's cloud.google.com/gke-accelerator values for the GPUs its machine families carry
GPU_TYPES = {
    "t4": "nvidia-tesla-t4",
    "l4": "nvidia-l4",
    "a100": "nvidia-tesla-a100",
    "a100-80gb": "nvidia-a100-80gb",
    "h100": "nvidia-h100-80gb",
    "h100-mega": "nvidia-h100-mega-80gb",
    "h200": "nvidia-h200-141gb",
    "b200": "nvidia-b200",
}
GPU_COUNTS = (1, 2, 4, 8, 16)   # GPUs per node GKE machine shapes offer (16: a2-megagpu-16g)

TPU_TOLERATION = {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SPOT_SELECTOR = "cloud.google.com/gke-spot"

# Pod sizes when the config leaves cpu/memory/disk at 0, per chip / per GPU, so that the pod
# fits the smallest GKE machine carrying that many (a v5e ct5lp-hightpu-1t has 24 vCPUs and 48 GB,
# -4t 112 and 192 GB; a g2-standard-8 with one L4 8 vCPUs and 32 GB; an a3-highgpu-8g 208 and
# 1872 GB) with room for the kubelet and GKE's daemons. Disk stays under the 100 GB boot disk.
# Set compute.<stage>.cpu/memory to use more of a big host.
PER_CHIP = {"cpu": 8, "memory": 32768}
PER_GPU = {"cpu": 4, "memory": 16384}
POD_DISK = 51200


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    type: TpuType
    topology: str
    chips: int
    hosts: int
    chips_per_host: int

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def tpu_type(name: str) -> TpuType:
    key = TPU_ALIASES.get(str(name).strip().lower())
    if key is None:
        raise ComputeError(f"unknown TPU type {name!r}; choose one of {', '.join(sorted(TPU_TYPES))} "
                           f"(v5litepod = v5e)")
    return TPU_TYPES[key]


def tpu_slice(type_name: str, topology: str) -> TpuSlice:
    """Validate a TPU type + topology and work out chips, hosts and chips per host."""
    kind = tpu_type(type_name)
    topo = str(topology).strip().lower()
    try:
        dims = [int(d) for d in topo.split("x")]
    except ValueError:
        dims = []
    if kind.topologies:
        if topo not in kind.topologies:
            raise ComputeError(f"TPU {kind.name} topology {topology!r} is not offered; "
                               f"choose one of {', '.join(kind.topologies)}")
    elif (len(dims) != 3 or min(dims) < 1 or not (all(d <= 4 for d in dims) or all(d % 4 == 0 for d in dims))
          or math.prod(dims) % 4 or math.prod(dims) > kind.max_chips):
        raise ComputeError(f"TPU {kind.name} topology {topology!r} is not valid; use AxBxC with A, B, C all "
                           f"<= 4 or all multiples of 4, a multiple of 4 chips, at most {kind.max_chips} "
                           f"(e.g. 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8)")
    chips = math.prod(dims)
    per_host = chips if chips <= kind.single_host_max else kind.host_chips
    return TpuSlice(kind, topo, chips, chips // per_host, per_host)


def gpu_accelerator(type_name: str, count: int) -> str:
    """The GKE accelerator label for `count` GPUs of `type_name` on one node."""
    label = GPU_TYPES.get(str(type_name).strip().lower())
    if label is None:
        raise ComputeError(f"unknown GPU type {type_name!r}; choose one of {', '.join(GPU_TYPES)}")
    if count not in GPU_COUNTS:
        raise ComputeError(f"GPU count {count} is not a node shape GKE offers; choose one of "
                           f"{', '.join(map(str, GPU_COUNTS))} (one node per step)")
    return label


# --------------------------------------------------------------------------- per-stage placement

@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one stage runs, validated. `decorator` is the Metaflow step decorator to attach
    ("tpu" or "kubernetes", None = local) and `attributes` its keyword arguments."""
    stage: str
    kind: str
    decorator: str | None
    attributes: dict[str, Any]
    hosts: int = 1


def placement(stage: str, spec: Any, tpu_image: str = "", gpu_image: str = "") -> Placement:
    """Validate one stage's compute settings (attributes kind/type/topology/count/cpu/memory/
    disk/spot/image, as in config.StageComputeConfig) and say which decorator it needs."""
    where = f"compute.{stage}"
    kind = spec.kind
    if kind not in KINDS:
        raise ComputeError(f"{where}.kind={kind!r} must be one of {', '.join(KINDS)}")
    if kind == "local":
        stray = [f for f in ("type", "topology", "count", "cpu", "memory", "disk", "spot", "image") if getattr(spec, f)]
        if stray:
            raise ComputeError(f"{where}.{stray[0]} is set but {where}.kind is local; "
                               f"set {where}.kind to tpu or gpu, or remove it")
        return Placement(stage, "local", None, {})
    sizes = {k: getattr(spec, k) for k in ("cpu", "memory", "disk")}   # 0: the defaults above
    image = spec.image or (tpu_image if kind == "tpu" else gpu_image)
    try:
        if kind == "tpu":
            if spec.count:
                raise ComputeError(f"{where}.count applies to GPUs; a TPU slice's size is its topology")
            if not spec.type or not spec.topology:
                raise ComputeError(f"{where}: a TPU stage needs type (one of {', '.join(sorted(TPU_TYPES))}) "
                                   f"and topology (e.g. 2x2)")
            sl = tpu_slice(spec.type, spec.topology)
            attrs = {"type": sl.type.name, "topology": sl.topology, "spot": bool(spec.spot),
                     **{k: v for k, v in sizes.items() if v}}
            if image:
                attrs["image"] = image
            return Placement(stage, "tpu", "tpu", attrs, sl.hosts)
        if spec.topology:
            raise ComputeError(f"{where}.topology applies to TPUs; a GPU stage takes type and count")
        attrs = gpu_kubernetes_attributes(spec.type, spec.count, image=image, spot=bool(spec.spot), **sizes)
        return Placement(stage, "gpu", "kubernetes", attrs)
    except ComputeError as exc:
        msg = str(exc)
        raise ComputeError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def gpu_kubernetes_attributes(type_name: str, count: int, image: str = "", spot: bool = False,
                              cpu: int = 0, memory: int = 0, disk: int = 0) -> dict[str, Any]:
    """@kubernetes keyword arguments for a step on one GKE GPU node."""
    selector = {"cloud.google.com/gke-accelerator": gpu_accelerator(type_name, count)}
    if spot:
        selector[SPOT_SELECTOR] = "true"
    memory = memory or PER_GPU["memory"] * count
    attrs: dict[str, Any] = {
        "gpu": count, "gpu_vendor": "nvidia", "node_selector": selector, "tolerations": [dict(GPU_TOLERATION)],
        "cpu": cpu or PER_GPU["cpu"] * count, "memory": memory, "disk": disk or POD_DISK,
        # NCCL and JAX's host transfers use /dev/shm, which a pod caps at 64 MB by default; it
        # counts against the pod's memory, hence at most half of it
        "shared_memory": min(16384, memory // 2),
    }
    if image:
        attrs["image"] = image
    return attrs


def tpu_kubernetes_attributes(sl: TpuSlice, image: str = "", spot: bool = False, cpu: int = 0, memory: int = 0,
                              disk: int = 0) -> dict[str, Any]:
    """@kubernetes keyword arguments for one host (pod) of the TPU slice `sl`."""
    selector = {"cloud.google.com/gke-tpu-accelerator": sl.type.accelerator,
                "cloud.google.com/gke-tpu-topology": sl.topology}
    if spot:
        selector[SPOT_SELECTOR] = "true"
    attrs: dict[str, Any] = {
        "node_selector": selector,
        # GKE schedules a TPU pod only onto a TPU node and only when it requests every chip of
        # that host; "google.com/tpu" is an extended resource, not a GPU vendor
        "extended_resources": {"google.com/tpu": str(sl.chips_per_host)},
        "tolerations": [dict(TPU_TOLERATION)],
        "cpu": cpu or PER_CHIP["cpu"] * sl.chips_per_host, "memory": memory or PER_CHIP["memory"] * sl.chips_per_host,
        "disk": disk or POD_DISK,
    }
    if image:
        attrs["image"] = image
    return attrs


# --------------------------------------------------------------------------- multi-host TPU environment

def tpu_worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """TPU_WORKER_ID / TPU_WORKER_HOSTNAMES for this host of a multi-host slice run as a
    Metaflow JobSet, from the variables Metaflow sets in every pod.

    Metaflow names the control pod `<jobset>-control-0-0.<jobset>.<namespace>.svc.cluster.local`
    (MF_MASTER_ADDR) and worker i (node i+1) `<jobset>-worker-<i>-0.<same domain>`; the JobSet's
    headless service makes these resolvable. libtpu wants every host's name in node order, and
    this host's position in that list as its worker id. Returns {} outside a JobSet (no
    MF_MASTER_ADDR, e.g. a local @parallel run), where there is no TPU slice to wire."""
    master = env.get("MF_MASTER_ADDR", "")
    if not master:
        return {}
    try:
        hosts = int(env["MF_PARALLEL_NUM_NODES"])
        index = int(env["MF_PARALLEL_NODE_INDEX"])
    except (KeyError, ValueError) as exc:
        raise ComputeError(f"MF_PARALLEL_NUM_NODES / MF_PARALLEL_NODE_INDEX missing or not integers ({exc}); "
                           f"a multi-host TPU step must run under @parallel on Kubernetes") from None
    first, _, domain = master.partition(".")
    suffix = "-control-0-0"
    if not first.endswith(suffix) or not domain:
        raise ComputeError(f"MF_MASTER_ADDR={master!r} does not look like Metaflow's JobSet control address "
                           f"<jobset>-control-0-0.<jobset>.<namespace>.svc.cluster.local")
    if not 0 <= index < hosts:
        raise ComputeError(f"MF_PARALLEL_NODE_INDEX={index} is outside [0, {hosts})")
    jobset = first[: -len(suffix)]
    names = [master] + [f"{jobset}-worker-{i}-0.{domain}" for i in range(hosts - 1)]
    return {"TPU_WORKER_ID": str(index), "TPU_WORKER_HOSTNAMES": ",".join(names)}
