"""FullPipelineFlow: tokenizer -> pretrain -> sft -> grpo -> eval -> export, as Metaflow steps.

Each stage step calls one `steps.<stage>.run(config, inputs, output_uri)` and stores the
returned manifest as the artifact `<stage>_manifest` (`self.tokenizer_manifest`, …). Big files
live under the manifest's `uri`; the artifacts stay small. Consumers read upstream manifests only.

    python flows/full_pipeline.py run --preset demo
    python flows/full_pipeline.py --config config overrides.yaml run --depth 8
    python flows/full_pipeline.py resume            # finished steps are cloned, not rerun
"""

import contextlib
import getpass
import os
import subprocess

# Metaflow refuses to run without a non-root user name; in a container/CI running as root
# that would stop the demo for no reason, so name the user "flaxchat" there.
if (os.environ.get("METAFLOW_USER") or os.environ.get("USERNAME") or os.environ.get("USER")
        or getpass.getuser()) == "root":
    os.environ.setdefault("METAFLOW_USER", "flaxchat")

import yaml  # noqa: E402
from metaflow import Config, FlowSpec, Parameter, card, current, parallel, step  # noqa: E402
from metaflow.exception import MetaflowException  # noqa: E402

from flaxchat.config import PipelineConfig, build_config  # noqa: E402
# per-stage placement (the config's `compute` section) as @tpu / @kubernetes on the steps
from metaflow_extensions.flaxchat.plugins.stage_compute import stage_compute  # noqa: E402


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def origin_chain(flow_name: str, origin_run_id: str | None) -> list[str]:
    """The runs a resumed run continues, nearest first: its origin, the origin's origin, …

    Metaflow hands a task only its immediate origin (`current.origin_run_id`); every task of a
    resumed run, cloned or rerun, records that run's origin as `origin-run-id` metadata, so the
    chain is read back from there through the client."""
    chain: list[str] = []
    run_id = origin_run_id
    while run_id and run_id not in chain:
        chain.append(run_id)
        run_id = _origin_of(f"{flow_name}/{run_id}")
    return chain


def _origin_of(pathspec: str) -> str | None:
    """The run `pathspec` resumed, or None for a fresh run."""
    from metaflow import Run
    try:
        for step_ in Run(pathspec, _namespace_check=False):
            for task in step_:
                origin = task.metadata_dict.get("origin-run-id")
                return origin if origin and origin != "None" else None   # "None": a fresh run
    except Exception as exc:  # the run is gone, the metadata service is unreachable, …
        print(f"warning: cannot read which run {pathspec} resumed ({type(exc).__name__}: {exc}); "
              f"checkpoints of runs before it are not searched")
    return None


def _leave_distributed() -> None:
    """Leave the multi-process JAX job while every process of the @parallel step is still in it.
    Left to interpreter exit, a local worker would wait in JAX's shutdown barrier for node 0 while
    node 0 waits for the worker process to end (Metaflow's local @parallel), for the barrier's 300 s."""
    import jax
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


# the stages whose manifests each stage reads (the DAG's data edges)
UPSTREAM = {"tokenizer": (), "pretrain": ("tokenizer",), "sft": ("pretrain",), "grpo": ("sft",),
            "eval": ("tokenizer", "pretrain", "sft", "grpo"), "export": ("pretrain", "sft", "grpo")}


class PipelineInputError(MetaflowException):
    headline = "flaxchat: bad input"


@contextlib.contextmanager
def clear_errors():
    """Our ValueErrors (ConfigError, DataError, ManifestError, …) already say what is wrong and
    how to fix it: show that one line instead of a traceback."""
    try:
        yield
    except ValueError as exc:
        raise PipelineInputError(f"{type(exc).__name__}: {exc}") from None


@stage_compute("config")
class FullPipelineFlow(FlowSpec):
    """Train a chat model end to end; every stage is a versioned, resumable step."""

    overrides = Config("config", default_value={}, parser=yaml.safe_load,
                       help="YAML file of config overrides (sections: model, tokenizer, data, mesh, pretrain, "
                            "tasks, sft, rl, grpo, eval, export, compute)")
    preset = Parameter("preset", default="nanochat",
                       help="nanochat (its recipe at --depth) | demo (laptop, generated data) | tinystories | "
                            "climbmix | speedrun")
    depth = Parameter("depth", type=int, default=0, help="model depth (0 = the preset's)")
    fresh = Parameter("fresh", type=bool, default=False,
                      help="recompute every stage; by default a stage whose config sections, inputs and code match "
                           "a finished output under the artifact root reuses it")
    max_hours = Parameter("max-hours", type=float, default=24.0,
                          help="stop in start when a stage set to run on this machine is estimated to take longer "
                               "(0 = no limit)")
    artifact_root = Parameter("artifact-root", default="./artifacts",
                              help="where stage outputs go: a local directory or gs://bucket/prefix")

    def _config(self) -> PipelineConfig:
        return PipelineConfig.from_dict(self.pipeline_config)

    def _stage_uri(self, stage: str) -> str:
        """This run's output location for a stage. Built from the CURRENT run id, so a stage
        rerun by `resume` never writes into the origin run's outputs."""
        from flaxchat import storage
        return storage.join(self.artifact_base, current.flow_name, current.run_id, stage)

    def _show(self, stage: str, components: list, manifest: dict) -> None:
        """The stage's own summary, then where it came from (flows/provenance.py)."""
        from flows.provenance import provenance
        inputs = {name: getattr(self, f"{name}_manifest") for name in UPSTREAM[stage]}
        for component in components + provenance(stage, manifest, inputs, self.pipeline_config, current.flow_name):
            current.card[stage].append(component)

    def _resume_sources(self, stage: str) -> list[str]:
        """After `resume`: this stage's checkpoint directories in the origin run, the origin's
        origin, … nearest first. A resumed run that itself died before its first checkpoint
        leaves the newest one further up the chain."""
        from flaxchat import storage
        runs = origin_chain(current.flow_name, current.origin_run_id)
        if runs:
            print(f"{stage}: resumed; looking for checkpoints in runs {', '.join(runs)} (nearest first)")
        return [storage.join(self.artifact_base, current.flow_name, run_id, stage, "checkpoints") for run_id in runs]

    def _produce(self, stage: str, inputs: dict, compute, record: bool = True) -> dict:
        """The stage's manifest: a finished output with the same key (flaxchat/reuse.py: the config
        sections the stage reads, its inputs' keys, the code version) is reused unless --fresh;
        otherwise `compute(output_uri)` makes it and, if `record` (node 0 of a @parallel stage),
        it is recorded for later runs to reuse."""
        from flaxchat import reuse
        key = reuse.stage_key(stage, self.pipeline_config, inputs)
        if not self.fresh:
            found = reuse.find(self.artifact_base, stage, key)
            if found is not None:
                print(f"{stage}: {reuse.describe(found)}")
                return found
        with clear_errors():
            manifest = compute(self._stage_uri(stage)) | {"reuse_key": key}
        if record:
            reuse.record(self.artifact_base, stage, key, manifest, run=f"{current.flow_name}/{current.run_id}")
        return manifest

    def _train_stage(self, name: str, inputs: dict, live, summary) -> dict | None:
        """Run a training stage in this process, one JAX host of the stage's `_processes` (a Metaflow
        @parallel task; jax.distributed joins the processes from MF_PARALLEL_*). After `resume`,
        continue from the newest checkpoint along the chain. Every process trains and writes its own
        checkpoint shards; node 0 alone writes the manifest, records it for reuse and fills the card,
        and only node 0's task returns the manifest (None elsewhere)."""
        import importlib
        stage = importlib.import_module(f"steps.{name}")
        lead = current.parallel.node_index == 0
        manifest = self._produce(name, inputs, lambda uri: stage.run(
            self._config(), inputs, uri, resume_from=self._resume_sources(name),
            extra_sinks=(live,) if lead else ()), record=lead)
        _leave_distributed()
        if not lead:
            return None
        self._show(name, summary(manifest), manifest)
        return manifest

    def _processes(self, stage: str) -> int:
        """How many processes (JAX hosts) run a training stage: the hosts of a multi-host TPU slice
        placed there (compute.<stage>), else mesh.num_parallel."""
        cfg = self._config()
        hosts = getattr(cfg.compute.placements().get(stage), "hosts", 1)
        if hosts > 1 and cfg.mesh.num_parallel not in (1, hosts):
            raise PipelineInputError(f"mesh.num_parallel={cfg.mesh.num_parallel} but compute.{stage} is a TPU slice "
                                     f"of {hosts} hosts; leave mesh.num_parallel at 1 or set it to {hosts}")
        return hosts if hosts > 1 else cfg.mesh.num_parallel

    def _node_zero(self, inputs, key: str) -> dict:
        """In the join after a @parallel training step: node 0's `key` (the others hold None), with
        every other artifact merged (they agree across the processes: all came from upstream)."""
        found = [getattr(task, key) for task in inputs if getattr(task, key) is not None]
        if len(found) != 1:
            raise PipelineInputError(f"expected one {key} (node 0's) among {len(inputs)} processes, found {len(found)}")
        self.merge_artifacts(inputs, exclude=[key])
        return found[0]

    def _plan(self, cfg: PipelineConfig) -> dict:
        """Print and store the plan (sizes, where each stage runs, time and cost); stop a run this
        machine cannot finish in --max-hours before anything heavy starts."""
        from flaxchat import plan
        hardware = plan.stage_hardware(cfg)
        with clear_errors():
            run_plan = plan.make_plan(cfg, hardware)
            print(run_plan.table())
            plan.check_feasible(run_plan, hardware, self.max_hours)
        return run_plan.to_dict()

    @step
    def start(self):
        """Resolve and validate the whole config once (every stage reads this copy) and make the plan."""
        # a relative --artifact-root is taken from where the run was started, once, here: every
        # later task, a resumed run and other machines read the absolute location this records
        root = self.artifact_root if "://" in self.artifact_root else os.path.abspath(self.artifact_root)
        with clear_errors():
            cfg = build_config(self.preset, depth=self.depth or None, overrides=dict(self.overrides or {}),
                               artifact_root=root.rstrip("/"))
        self.pipeline_config = cfg.to_dict()
        self.artifact_base = cfg.artifact_root
        self.plan = self._plan(cfg)
        self.git_revision = _git_revision()
        from metaflow import Run
        Run(current.pathspec.rsplit("/", 2)[0]).add_tags(
            [f"depth:{cfg.model.depth}", f"preset:{cfg.preset}", f"git:{self.git_revision}"])
        print(f"config resolved: preset={cfg.preset} depth={cfg.model.depth} dim={cfg.model.n_embd} "
              f"vocab={cfg.tokenizer.vocab_size}; outputs under {self.artifact_base}")
        self.next(self.tokenizer)

    @card(type="blank", id="tokenizer")
    @step
    def tokenizer(self):
        """Train the BPE tokenizer; report held-out bytes/token."""
        from steps import tokenizer
        from flows.cards import tokenizer_card
        self.tokenizer_manifest = self._produce("tokenizer", {}, lambda uri: tokenizer.run(self._config(), {}, uri))
        self._show("tokenizer", tokenizer_card(self.tokenizer_manifest), self.tokenizer_manifest)
        self.next(self.launch_pretrain)

    @step
    def launch_pretrain(self):
        """Fan out to the pretrain processes. A step of its own because `resume` never clones the step
        that fans out to a @parallel step (Metaflow treats it as part of the gang): this one is free to
        rerun, the tokenizer is cloned."""
        self.next(self.pretrain, num_parallel=self._processes("pretrain"))

    @card(type="blank", id="pretrain", refresh_interval=10)
    @parallel
    @step
    def pretrain(self):
        """Pretrain the GPT on the corpus; val bits per byte falls."""
        from flows.cards import LiveTrainingCard, pretrain_summary
        live = LiveTrainingCard(current.card["pretrain"], f"Pretraining d{self._config().model.depth}")
        self.pretrain_manifest = self._train_stage("pretrain", {"tokenizer": self.tokenizer_manifest}, live,
                                                   pretrain_summary)
        self.next(self.pretrain_join)

    @step
    def pretrain_join(self, inputs):
        """The pretrain processes meet; node 0's manifest goes on as `pretrain_manifest`."""
        self.pretrain_manifest = self._node_zero(inputs, "pretrain_manifest")
        self.next(self.launch_sft)

    @step
    def launch_sft(self):
        """Fan out to the SFT processes (a Metaflow join step cannot fan out itself)."""
        self.next(self.sft, num_parallel=self._processes("sft"))

    @card(type="blank", id="sft", refresh_interval=10)
    @parallel
    @step
    def sft(self):
        """Supervised fine-tuning on the chat task mixture; held-out conversation loss falls."""
        from flows.cards import LiveTrainingCard, sft_summary
        live = LiveTrainingCard(current.card["sft"], "Supervised fine-tuning",
                                (("val_loss", "held-out loss (nats/token)"), ("greedy_pass@1", "greedy accuracy")))
        self.sft_manifest = self._train_stage("sft", {"pretrain": self.pretrain_manifest}, live, sft_summary)
        self.next(self.sft_join)

    @step
    def sft_join(self, inputs):
        """The SFT processes meet; node 0's manifest goes on as `sft_manifest`."""
        self.sft_manifest = self._node_zero(inputs, "sft_manifest")
        self.next(self.launch_grpo)

    @step
    def launch_grpo(self):
        """Fan out to the GRPO processes (a Metaflow join step cannot fan out itself)."""
        self.next(self.grpo, num_parallel=self._processes("grpo"))

    @card(type="blank", id="grpo", refresh_interval=10)
    @parallel
    @step
    def grpo(self):
        """GRPO with calculator tool use on problems with checkable answers; held-out pass@1 rises."""
        from flows.cards import LiveTrainingCard, grpo_summary
        k = self._config().rl.eval_samples
        live = LiveTrainingCard(current.card["grpo"], "GRPO with tool use",
                                (("pass@1", "held-out pass@1"), (f"pass@{k}", f"held-out pass@{k}")))
        self.grpo_manifest = self._train_stage("grpo", {"sft": self.sft_manifest}, live, grpo_summary)
        self.next(self.grpo_join)

    @step
    def grpo_join(self, inputs):
        """The GRPO processes meet; node 0's manifest goes on as `grpo_manifest`."""
        self.grpo_manifest = self._node_zero(inputs, "grpo_manifest")
        self.next(self.eval)

    @card(type="blank", id="eval")
    @step
    def eval(self):
        """CORE for the base model, the chat tasks for SFT and RL; the run's report card."""
        from steps import eval as eval_stage
        from flows.cards import eval_card
        inputs = {"tokenizer": self.tokenizer_manifest, "pretrain": self.pretrain_manifest,
                  "sft": self.sft_manifest, "grpo": self.grpo_manifest}
        self.eval_manifest = self._produce("eval", inputs, lambda uri: eval_stage.run(
            self._config(), inputs, uri, git_revision=self.git_revision))
        self._show("eval", eval_card(self.eval_manifest), self.eval_manifest)
        self.next(self.export)

    @card(type="blank", id="export")
    @step
    def export(self):
        """The final model as Hugging Face, nanochat, ONNX and LiteRT files, each checked against JAX."""
        from steps import export as export_stage
        from flows.cards import export_card
        inputs = {"pretrain": self.pretrain_manifest, "sft": self.sft_manifest, "grpo": self.grpo_manifest}
        self.export_manifest = self._produce("export", inputs, lambda uri: export_stage.run(self._config(), inputs, uri))
        self._show("export", export_card(self.export_manifest), self.export_manifest)
        self.next(self.end)

    @step
    def end(self):
        tok = self.tokenizer_manifest
        m = tok["metrics"]
        print(f"tokenizer: vocab {m['vocab_size']}, {m['bytes_per_token']:.3f} bytes/token -> {tok['uri']}")
        pt = self.pretrain_manifest
        m = pt["metrics"]
        print(f"pretrain: val bpb {_fmt(m['val_bpb_initial'])} -> {_fmt(m['val_bpb'])} in {m['steps']} steps "
              f"-> {pt['checkpoint']['dir']}")
        m = self.sft_manifest["metrics"]
        print(f"sft: held-out loss {_fmt(m['val_loss_initial'])} -> {_fmt(m['val_loss'])}, greedy accuracy "
              f"{_fmt(m['greedy_accuracy_initial'])} -> {_fmt(m['greedy_accuracy'])} in {m['steps']} steps")
        m = self.grpo_manifest["metrics"]
        print(f"grpo: held-out pass@1 {_fmt(m['pass@1_initial'])} -> {_fmt(m['pass@1'])} in {m['steps']} steps")
        ev = self.eval_manifest
        print(f"eval: " + ", ".join(f"{k} {v:.4f}" for k, v in ev["metrics"].items()) + f" -> {ev['uri']}/report.md")
        ex = self.export_manifest
        print("export: " + ", ".join(f"{name} {f['status']}" for name, f in ex["formats"].items()) + f" -> {ex['uri']}")


if __name__ == "__main__":
    FullPipelineFlow()
