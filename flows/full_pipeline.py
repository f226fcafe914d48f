"""FullPipelineFlow: tokenizer -> pretrain -> sft -> grpo -> eval -> export, as Metaflow steps.

Each stage step calls one `steps.<stage>.run(config, inputs, output_uri)` and stores the
returned manifest as an artifact named after the stage. Big files live under the
manifest's `uri`; the artifacts stay small. Consumers read upstream manifests only.

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
from metaflow import Config, FlowSpec, Parameter, card, current, step  # noqa: E402
from metaflow.exception import MetaflowException  # noqa: E402

from flaxchat.config import PipelineConfig, build_config  # noqa: E402


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(value) -> str:
    return "resumed" if value is None else f"{value:.4f}"


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


class FullPipelineFlow(FlowSpec):
    """Train a chat model end to end; every stage is a versioned, resumable step."""

    overrides = Config("config", default_value={}, parser=yaml.safe_load,
                       help="YAML file of config overrides (sections: model, tokenizer, data, mesh, pretrain, "
                            "tasks, sft, rl, grpo, eval, export)")
    preset = Parameter("preset", default="demo", help="demo | tinystories | climbmix | speedrun")
    depth = Parameter("depth", type=int, default=0, help="model depth (0 = the preset's)")
    artifact_root = Parameter("artifact-root", default="./artifacts",
                              help="where stage outputs go: a local directory or gs://bucket/prefix")

    def manifest(self, stage: str) -> dict:
        """An upstream stage's manifest artifact. Step methods and their artifacts share the
        stage's name, so `self.<stage>` finds the method; read the artifact explicitly."""
        return FlowSpec.__getattr__(self, stage)

    def _config(self) -> PipelineConfig:
        return PipelineConfig.from_dict(self.pipeline_config)

    def _stage_uri(self, stage: str) -> str:
        """This run's output location for a stage. Built from the CURRENT run id, so a stage
        rerun by `resume` never writes into the origin run's outputs."""
        from flaxchat import storage
        return storage.join(self.artifact_base, current.flow_name, current.run_id, stage)

    @step
    def start(self):
        """Resolve and validate the whole config once; every stage reads this copy."""
        with clear_errors():
            cfg = build_config(self.preset, depth=self.depth or None, overrides=dict(self.overrides or {}),
                               artifact_root=self.artifact_root)
        self.pipeline_config = cfg.to_dict()
        root = cfg.artifact_root if "://" in cfg.artifact_root else os.path.abspath(cfg.artifact_root)
        self.artifact_base = root.rstrip("/")
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
        with clear_errors():
            self.tokenizer = tokenizer.run(self._config(), {}, self._stage_uri("tokenizer"))
        for component in tokenizer_card(self.tokenizer):
            current.card["tokenizer"].append(component)
        self.next(self.pretrain)

    def _train_stage(self, name: str, inputs: dict, live, summary) -> dict:
        """Run a training stage; after `resume`, continue from the origin run's last good checkpoint."""
        import importlib
        from flaxchat import storage
        resume_from = None
        if current.origin_run_id:  # a rerun by `resume`: the failed attempt's checkpoints live there
            resume_from = storage.join(self.artifact_base, current.flow_name, current.origin_run_id,
                                       name, "checkpoints")
        stage = importlib.import_module(f"steps.{name}")
        with clear_errors():
            manifest = stage.run(self._config(), inputs, self._stage_uri(name), resume_from=resume_from,
                                 extra_sinks=(live,))
        for component in summary(manifest):
            current.card[name].append(component)
        return manifest

    @card(type="blank", id="pretrain", refresh_interval=10)
    @step
    def pretrain(self):
        """Pretrain the GPT on the corpus; val bits per byte falls."""
        from flows.cards import LiveTrainingCard, pretrain_summary
        live = LiveTrainingCard(current.card["pretrain"], f"Pretraining d{self._config().model.depth}")
        self.pretrain = self._train_stage("pretrain", {"tokenizer": self.manifest("tokenizer")}, live,
                                          pretrain_summary)
        self.next(self.sft)

    @card(type="blank", id="sft", refresh_interval=10)
    @step
    def sft(self):
        """Supervised fine-tuning on the chat task mixture; held-out conversation loss falls."""
        from flows.cards import LiveTrainingCard, sft_summary
        live = LiveTrainingCard(current.card["sft"], "Supervised fine-tuning",
                                (("val_loss", "held-out loss (nats/token)"), ("greedy_pass@1", "greedy accuracy")))
        self.sft = self._train_stage("sft", {"pretrain": self.manifest("pretrain")}, live, sft_summary)
        self.next(self.grpo)

    @card(type="blank", id="grpo", refresh_interval=10)
    @step
    def grpo(self):
        """GRPO with calculator tool use on problems with checkable answers; held-out pass@1 rises."""
        from flows.cards import LiveTrainingCard, grpo_summary
        k = self._config().rl.eval_samples
        live = LiveTrainingCard(current.card["grpo"], "GRPO with tool use",
                                (("pass@1", "held-out pass@1"), (f"pass@{k}", f"held-out pass@{k}")))
        self.grpo = self._train_stage("grpo", {"sft": self.manifest("sft")}, live, grpo_summary)
        self.next(self.eval)

    @card(type="blank", id="eval")
    @step
    def eval(self):
        """CORE for the base model, the chat tasks for SFT and RL; the run's report card."""
        from steps import eval as eval_stage
        from flows.cards import eval_card
        inputs = {name: self.manifest(name) for name in ("tokenizer", "pretrain", "sft", "grpo")}
        with clear_errors():
            self.eval = eval_stage.run(self._config(), inputs, self._stage_uri("eval"), git_revision=self.git_revision)
        for component in eval_card(self.eval):
            current.card["eval"].append(component)
        self.next(self.export)

    @card(type="blank", id="export")
    @step
    def export(self):
        """The final model as Hugging Face, nanochat, ONNX and LiteRT files, each checked against JAX."""
        from steps import export as export_stage
        from flows.cards import export_card
        inputs = {name: self.manifest(name) for name in ("pretrain", "sft", "grpo")}
        with clear_errors():
            self.export = export_stage.run(self._config(), inputs, self._stage_uri("export"))
        for component in export_card(self.export):
            current.card["export"].append(component)
        self.next(self.end)

    @step
    def end(self):
        tok = self.manifest("tokenizer")
        m = tok["metrics"]
        print(f"tokenizer: vocab {m['vocab_size']}, {m['bytes_per_token']:.3f} bytes/token -> {tok['uri']}")
        pt = self.manifest("pretrain")
        m = pt["metrics"]
        start = "resumed" if m["val_bpb_initial"] is None else f"{m['val_bpb_initial']:.4f}"
        print(f"pretrain: val bpb {start} -> {m['val_bpb']:.4f} in {m['steps']} steps -> {pt['checkpoint']['dir']}")
        m = self.manifest("sft")["metrics"]
        print(f"sft: held-out loss {_fmt(m['val_loss_initial'])} -> {m['val_loss']:.4f}, greedy accuracy "
              f"{_fmt(m['greedy_accuracy_initial'])} -> {m['greedy_accuracy']:.3f} in {m['steps']} steps")
        m = self.manifest("grpo")["metrics"]
        print(f"grpo: held-out pass@1 {_fmt(m['pass@1_initial'])} -> {m['pass@1']:.3f} in {m['steps']} steps")
        ev = self.manifest("eval")
        print(f"eval: " + ", ".join(f"{k} {v:.4f}" for k, v in ev["metrics"].items()) + f" -> {ev['uri']}/report.md")
        ex = self.manifest("export")
        print("export: " + ", ".join(f"{name} {f['status']}" for name, f in ex["formats"].items()) + f" -> {ex['uri']}")


if __name__ == "__main__":
    FullPipelineFlow()
