"""@tpu: run a Metaflow step on a GKE TPU slice.

    @tpu(type="v6e", topology="2x4")          # one host, 8 chips: a plain Kubernetes Job
    @step
    def pretrain(self): ...

    @tpu(type="v5e", topology="4x4")          # 16 chips on 4 hosts: a JobSet, one pod per host
    @step
    def pretrain(self): ...                   # reached with self.next(self.pretrain, num_parallel=4),
                                              # followed by a join step
Why a decorator of our own: Metaflow's @kubernetes knows GPUs (nvidia/amd vendors) but not
TPUs. @tpu turns a type and topology into what GKE needs (flaxchat/compute.py holds the
tables): node selectors `cloud.google.com/gke-tpu-accelerator` / `-topology`, the extended
resource `google.com/tpu` (chips per host), the TPU taint's toleration, the image and pod
size. It attaches (or completes) the step's @kubernetes with them, so everything @kubernetes
does (code package, logs, retries, Argo) stays Metaflow's own.

A slice with more chips than one host carries is a gang of hosts that only work together.
For those, @tpu is itself a `@parallel` decorator (a ParallelDecorator subclass, the way
Metaflow's own @pytorch_parallel is): Metaflow then launches the step as a JobSet with one
pod per host, and before the step body runs, every pod gets TPU_WORKER_ID and
TPU_WORKER_HOSTNAMES derived from Metaflow's MF_PARALLEL_* / MF_MASTER_ADDR (GKE injects them
only for an Indexed Job, not for the one-pod Jobs of a JobSet). `flaxchat.distributed`
then joins JAX's processes through MF_PARALLEL_MAIN_IP / NUM_NODES / NODE_INDEX.
"""

import os

from metaflow.exception import MetaflowException
from metaflow.plugins.parallel_decorator import ParallelDecorator
from metaflow.unbounded_foreach import UBF_CONTROL

from flaxchat.compute import ComputeError, TpuSlice, tpu_kubernetes_attributes, tpu_slice, tpu_worker_env


class TpuException(MetaflowException):
    headline = "@tpu"


# the pod sizes; @kubernetes keeps them as strings (its defaults: cpu "1", memory "4096", disk "10240")
_KUBE_DEFAULT_SIZES = {"cpu": "1", "memory": "4096", "disk": "10240"}


class TpuDecorator(ParallelDecorator):
    """
    Run this step on a GKE TPU slice.

    Parameters
    ----------
    type : str
        TPU generation: v4, v5e (= v5litepod), v5p or v6e.
    topology : str
        Slice shape, e.g. "2x2" (v5e/v6e, one host), "4x4" (v5e/v6e, 4 hosts), "2x2x1" (v4/v5p).
    image : str, optional
        Container image (one with jax[tpu]); default METAFLOW_KUBERNETES_CONTAINER_IMAGE.
    cpu, memory, disk : int, optional
        Pod size per host (memory/disk in MB); default 8 CPUs and 32 GB per chip on the host, 50 GB disk.
    spot : bool, default False
        Select Spot TPU nodes.
    """

    name = "tpu"
    defaults = {"type": None, "topology": None, "image": None, "cpu": None, "memory": None, "disk": None,
                "spot": False}

    # Metaflow's graph reads IS_PARALLEL from each decorator instance: only a multi-host
    # slice makes the step a @parallel gang (ParallelDecorator sets it True for every step).
    @property
    def IS_PARALLEL(self):
        try:
            return self.slice.multi_host
        except (ComputeError, TypeError, AttributeError):   # unresolved or bad: step_init says why
            return False

    @property
    def slice(self) -> TpuSlice:
        return tpu_slice(self.attributes["type"], self.attributes["topology"])

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        if not self.attributes["type"] or not self.attributes["topology"]:
            raise TpuException(f"step {step_name}: @tpu needs type= (v4, v5e, v5p, v6e) and topology= (e.g. 2x2)")
        try:
            sl = self.slice
        except ComputeError as exc:
            raise TpuException(f"step {step_name}: {exc}") from None
        if any(d.name == "batch" for d in decorators):
            raise TpuException(f"step {step_name}: @tpu runs on GKE; remove @batch")
        if sl.multi_host:
            _check_gang(graph, step_name, sl)
            super().step_init(flow, graph, step_name, decorators, environment, flow_datastore, logger)
        attrs = tpu_kubernetes_attributes(sl, image=self.attributes["image"] or "", spot=bool(self.attributes["spot"]),
                                          cpu=int(self.attributes["cpu"] or 0),
                                          memory=int(self.attributes["memory"] or 0),
                                          disk=int(self.attributes["disk"] or 0))
        kube = next((d for d in decorators if d.name == "kubernetes"), None)
        if kube is None:
            # Inserted, not given on the command line: Metaflow does not forward it to the task
            # subprocesses; each of them runs this step_init again and re-inserts it. Appending to
            # `decorators` (the step's own list) while Metaflow walks it means its step_init runs next.
            from metaflow.plugins.kubernetes.kubernetes_decorator import KubernetesDecorator
            kube = KubernetesDecorator(attributes={k: (str(v) if k in _KUBE_DEFAULT_SIZES else v)
                                                   for k, v in attrs.items()},
                                       statically_defined=False, inserted_by=[self.name] + (self.inserted_by or []))
            kube.external_init()
            decorators.append(kube)
        else:
            _complete(kube, attrs, step_name)

    def runtime_step_cli(self, cli_args, retry_count, max_user_code_retries, ubf_context):
        if not self.IS_PARALLEL:
            return
        if ubf_context == UBF_CONTROL:
            _check_width(self.slice, cli_args.task.step, cli_args.task.ubf_iter.num_parallel)
        super().runtime_step_cli(cli_args, retry_count, max_user_code_retries, ubf_context)

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph, retry_count,
                      max_user_code_retries, ubf_context, inputs):
        if self.IS_PARALLEL:
            # again here, in every pod: under Argo the local runtime's check never runs
            _check_width(self.slice, step_name, flow._parallel_ubf_iter.num_parallel)
            super().task_pre_step(step_name, task_datastore, metadata, run_id, task_id, flow, graph, retry_count,
                                  max_user_code_retries, ubf_context, inputs)

    def task_decorate(self, step_func, flow, graph, retry_count, max_user_code_retries, ubf_context):
        if not self.IS_PARALLEL:
            return step_func
        return super().task_decorate(step_func, flow, graph, retry_count, max_user_code_retries, ubf_context)

    def setup_distributed_env(self, flow):
        """Runs in every host's task just before the step body, i.e. before JAX starts."""
        try:
            env = tpu_worker_env(os.environ)
        except ComputeError as exc:
            raise TpuException(str(exc)) from None
        os.environ.update(env)
        if env:
            print(f"@tpu: host {env['TPU_WORKER_ID']} of {len(env['TPU_WORKER_HOSTNAMES'].split(','))}")


def _check_width(sl: TpuSlice, step_name: str, num_parallel: int) -> None:
    if num_parallel != sl.hosts:
        raise TpuException(f"step {step_name}: a TPU {sl.type.name} {sl.topology} slice has {sl.hosts} hosts but "
                           f"the step was called with num_parallel={num_parallel}; use num_parallel={sl.hosts}")


def _check_gang(graph, step_name, sl: TpuSlice) -> None:
    """A multi-host slice runs as @parallel: Metaflow needs the step to be reached through
    self.next(..., num_parallel=hosts) and to be followed by a join. Say so in one line
    instead of leaving it to the linter's generic message."""
    node = graph[step_name]
    callers = [graph[name] for name in node.in_funcs]
    fix = (f"call it with self.next(self.{step_name}, num_parallel={sl.hosts}) and follow it with a join step, "
           f"or pick a topology that fits one host")
    where = f"step {step_name}: a TPU {sl.type.name} {sl.topology} slice spans {sl.hosts} hosts, which run as one gang"
    if not callers or not all(c.parallel_foreach for c in callers):
        raise TpuException(f"{where}: {fix}")
    if not node.out_funcs or graph[node.out_funcs[0]].type != "join":
        raise TpuException(f"{where}: step {step_name} must be followed by a join step")
    for c in callers:
        if isinstance(c.num_parallel, int) and c.num_parallel not in (0, sl.hosts):
            raise TpuException(f"{where}: step {c.name} calls it with num_parallel={c.num_parallel}; "
                               f"use num_parallel={sl.hosts}")


def _complete(kube, attrs: dict, step_name: str) -> None:
    """Fold the TPU settings into a @kubernetes the step already has (in the code or from
    `--with kubernetes`): TPU selectors, resources and tolerations are added, pod sizes are the
    larger of the two, an image given to @tpu wins."""
    a = kube.attributes
    if a.get("gpu") not in (None, 0, "0"):
        raise TpuException(f"step {step_name}: @tpu and @kubernetes(gpu={a['gpu']}) cannot both apply; "
                           f"a step runs on TPUs or on GPUs")
    selector = a.get("node_selector") or {}
    if isinstance(selector, str):
        from metaflow.plugins.kubernetes.kube_utils import parse_kube_keyvalue_list
        selector = parse_kube_keyvalue_list(selector.split(","))
    a["node_selector"] = {**selector, **attrs["node_selector"]}
    a["extended_resources"] = {**(a.get("extended_resources") or {}), **attrs["extended_resources"]}
    tolerations = list(a.get("tolerations") or [])
    a["tolerations"] = tolerations + [t for t in attrs["tolerations"] if t not in tolerations]
    for key in _KUBE_DEFAULT_SIZES:
        larger = max(float(a.get(key) or 0), float(attrs[key]))
        a[key] = str(int(larger)) if larger.is_integer() else str(larger)
    if attrs.get("image"):
        a["image"] = attrs["image"]
