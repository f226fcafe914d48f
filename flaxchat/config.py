"""One typed config tree for the whole pipeline.

Every stage (tokenizer, pretrain, sft, grpo, eval, export) reads its knobs from a
`PipelineConfig`. It is built from a named preset, then overridden by a nested
YAML mapping and/or dotted `key=value` strings, then resolved (derived fields such
as the model width are filled in from `depth` by nanochat's rules). The resolved
tree is what every stage manifest records, so a consumer never has to re-derive a
model shape from a tag string.

Unknown or mistyped keys are errors that name the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad config value or key; the message says what is wrong and how to fix it."""


@dataclass
class ModelConfig:
    """The GPT's shape. `n_embd`/`n_head` are derived from depth like nanochat:
    model_dim = depth * aspect_ratio rounded up to a multiple of head_dim."""
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    n_kv_head: int = 0                # 0 = same as n_head (no GQA), as in every nanochat recipe
    sequence_len: int = 2048
    vocab_size: int = 0               # 0 = take the tokenizer's vocab size at resolve time
    window_pattern: str = "SSSL"      # tiled over layers; the last layer is always L
    softcap: float = 15.0
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"   # auto: bf16 on GPU/TPU, fp32 on CPU
    remat: Literal["none", "full", "dots"] = "none"
    attention_impl: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    # derived by resolve(); setting them by hand is an error
    n_embd: int = 0
    n_head: int = 0

    def derive(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"model.depth must be >= 1, got {self.depth}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be a positive even number, got {self.head_dim}")
        base = self.depth * self.aspect_ratio
        self.n_embd = int(math.ceil(base / self.head_dim) * self.head_dim)
        self.n_head = self.n_embd // self.head_dim
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (set 0 for no GQA)")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ConfigError(
                f"model.window_pattern={self.window_pattern!r} may only contain 'S' (short) and 'L' (long)")
        self.window_pattern = self.window_pattern.upper()

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab rounded up to a multiple of 64 (logits are sliced back)."""
        return ((self.vocab_size + 63) // 64) * 64

    def window_sizes(self) -> list[int]:
        """Per-layer attention window in tokens; `sequence_len` means full causal attention.
        Short window = ceil(T/4/128)*128 (512 at T=2048), capped at T."""
        short = min(self.sequence_len, int(math.ceil(self.sequence_len / 4 / 128) * 128))
        pattern = [self.window_pattern[i % len(self.window_pattern)] for i in range(self.depth)]
        pattern[-1] = "L"
        return [short if c == "S" else self.sequence_len for c in pattern]


@dataclass
class TokenizerConfig:
    vocab_size: int = 32768            # total, including the 256 bytes and the 9 special tokens
    max_chars: int = 2_000_000_000     # training text budget
    doc_cap: int = 10_000              # each document cropped to this many characters for training
    eval_chars: int = 2_000_000        # held-out text used for the bytes/token report


@dataclass
class DataConfig:
    source: str = "demo"               # demo | tinystories | climbmix | fineweb-edu | a local dir | gs://...
    cache_dir: str = "~/.cache/flaxchat/data"
    num_shards: int = 8                # shards to download for remote sources (last one is validation);
                                       # -1 = as many as pretraining's tokens need (flaxchat.plan.shards_needed)
    demo_documents: int = 20_000       # generated documents for the demo corpus
    demo_val_documents: int = 1_000
    download_timeout_s: float = 60.0
    download_retries: int = 5


@dataclass
class MeshConfig:
    data: int = -1                     # -1 = "the rest" of the devices
    fsdp: int = 1
    tensor: int = 1
    rules: Literal["replicated", "fsdp", "fsdp_tp"] = "fsdp"
    # JAX processes (hosts) each training stage runs on: the flow's Metaflow @parallel num_parallel.
    # The mesh above spans the devices of all of them; 1 = one process, no jax.distributed.
    num_parallel: int = 1


@dataclass
class TrainConfig:
    """Knobs shared by every training stage (pretrain, sft, grpo) and the one loop that runs them."""
    num_steps: int = -1                # -1 = derive from target_param_data_ratio
    target_param_data_ratio: float = 12.0
    device_batch_size: int = 32        # sequences per device per micro-step
    total_batch_size: int = -1         # tokens per optimizer step; -1 = nanochat's power law
    batch_lr_scaling: bool = True      # scale lrs by sqrt(B/2^19) like nanochat; tiny CPU batches turn it off
    matrix_lr: float = 0.02
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    value_embedding_lr: float = -1.0   # -1 = embedding_lr / 2, nanochat's fixed ratio (resolve() fills it)
    scalar_lr: float = 0.5
    smear_lr: float = 0.2
    weight_decay: float = 0.28
    init_lr_frac: float = 1.0          # every group's LR scaled by this (nanochat SFT 0.8, RL 0.05)
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    momentum_warmup_steps: int = 400   # Muon momentum start -> peak over these steps,
    momentum_start: float = 0.85       # then peak -> end across the LR warmdown
    momentum_peak: float = 0.97
    momentum_end: float = 0.90
    eval_every: int = 250
    eval_tokens: int = 10 * 524288
    sample_every: int = 2000
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3


def sft_defaults() -> TrainConfig:
    """nanochat's chat_sft: LRs inherited from pretraining at 0.8x, no warmup, warmdown over the
    last half to 0, no weight decay, Muon momentum 0.85 -> 0.95 over 300 steps; one epoch."""
    return TrainConfig(num_steps=-1, init_lr_frac=0.8, warmup_steps=0, warmdown_ratio=0.5, final_lr_frac=0.0,
                       weight_decay=0.0, momentum_warmup_steps=300, momentum_peak=0.95, momentum_end=0.95,
                       batch_lr_scaling=False, eval_every=150, eval_tokens=20 * 524288, sample_every=0,
                       checkpoint_every=200, log_every=10)


def grpo_defaults() -> TrainConfig:
    """nanochat's chat_rl: LRs at 0.05x decaying linearly to 0, no weight decay; one epoch of GSM8K."""
    return TrainConfig(num_steps=-1, init_lr_frac=0.05, warmup_steps=0, warmdown_ratio=1.0, final_lr_frac=0.0,
                       weight_decay=0.0, momentum_warmup_steps=300, momentum_peak=0.95, momentum_end=0.95,
                       batch_lr_scaling=False, device_batch_size=8, eval_every=60, sample_every=0,
                       checkpoint_every=60, log_every=1)


@dataclass
class TasksConfig:
    """Which conversations SFT trains on and GRPO samples from (flaxchat/tasks/)."""
    source: str = "auto"               # auto: demo when data.source is demo, else nanochat (HF datasets)
    user_jsonl: str = ""               # extra conversations, one JSON object per line (local or gs://)
    user_epochs: int = 2
    mmlu_epochs: int = 3               # nanochat oversamples MMLU auxiliary_train x3, GSM8K x4
    gsm8k_epochs: int = 4
    val_mmlu_max: int = 5200
    val_gsm8k_max: int = 420
    cache_dir: str = "~/.cache/flaxchat/tasks"
    demo_conversations: int = 6000     # demo source: generated chats and word problems
    demo_problems: int = 3000
    demo_val: int = 300


@dataclass
class RLConfig:
    """GRPO rollouts and objective (steps/grpo.py). nanochat's variant: advantage=drgrpo,
    updates_per_batch=1, kl_beta=0 (REINFORCE with a mean baseline)."""
    prompts_per_step: int = 16
    samples_per_prompt: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"
    updates_per_batch: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_beta: float = 0.0
    num_epochs: int = 1
    eval_problems: int = 400
    eval_samples: int = 8              # pass@1..pass@k on held-out problems


@dataclass
class EvalConfig:
    """The eval stage (steps/eval.py): CORE for the base model, the chat tasks for SFT and RL."""
    core_bundle: str = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # dir, zip, gs://,
    core_max_examples: int = -1        # per CORE task, -1 = all             # URL; "demo" = generated
    chat_max_problems: int = -1        # per chat task, -1 = all
    max_new_tokens: int = 512          # generative tasks (GSM8K with the calculator, HumanEval, SpellingBee)
    batch_rows: int = 16               # rows per scoring call (CORE and categorical tasks)
    hourly_price_usd: float = 0.0      # accelerator price per hour for the report's cost estimate
    cache_dir: str = "~/.cache/flaxchat/eval"


EXPORT_FORMATS = ("hf", "nanochat", "onnx", "litert")


@dataclass
class ExportConfig:
    """The export stage (steps/export.py): which formats, from which trained stage's model."""
    formats: str = ",".join(EXPORT_FORMATS)   # comma-separated subset of EXPORT_FORMATS
    source: str = "auto"               # auto = the last trained stage present (grpo, sft, pretrain), or one of them
    onnx_decoder: bool = True          # also export a one-token decode step with an explicit KV cache
    litert_seq_len: int = 0            # the LiteRT model's fixed window; 0 = min(model.sequence_len, 256)
    parity_new_tokens: int = 32        # greedy tokens each runtime must reproduce at export time
    parity_rtol: float = 1e-4          # max relative logits error allowed against the JAX model (fp32)

    def format_list(self) -> list[str]:
        return [f.strip() for f in self.formats.split(",") if f.strip()]


@dataclass
class StageComputeConfig:
    """Where one stage's step runs (flaxchat/compute.py checks it): `local` (this machine, or
    wherever `--with kubernetes` sends every step), a GKE TPU slice, or one GKE GPU node."""
    kind: Literal["local", "tpu", "gpu"] = "local"
    type: str = ""                     # tpu: v4 | v5e (= v5litepod) | v5p | v6e; gpu: h100, a100-80gb, l4, ...
    topology: str = ""                 # tpu: e.g. 2x2, 2x4 (one host), 4x4 (several hosts), 2x2x1
    count: int = 0                     # gpu: GPUs on the node (1, 2, 4, 8 or 16)
    cpu: int = 0                       # pod size per host; 0 = 8 CPUs + 32 GB per TPU chip, 4 + 16 GB per GPU
    memory: int = 0                    # MB
    disk: int = 0                      # MB
    spot: bool = False                 # select Spot nodes (cloud.google.com/gke-spot=true)
    image: str = ""                    # "" = compute.tpu_image / compute.gpu_image


@dataclass
class ComputeConfig:
    """Per-stage placement, applied to the flow's steps as @tpu / @kubernetes when the flow is
    loaded. Read from the --config YAML only (decorators are fixed before any step runs), so
    presets and --preset never move a stage. Default: everything local."""
    tpu_image: str = ""                # "" = METAFLOW_KUBERNETES_CONTAINER_IMAGE
    gpu_image: str = ""
    tokenizer: StageComputeConfig = field(default_factory=StageComputeConfig)
    pretrain: StageComputeConfig = field(default_factory=StageComputeConfig)
    sft: StageComputeConfig = field(default_factory=StageComputeConfig)
    grpo: StageComputeConfig = field(default_factory=StageComputeConfig)
    eval: StageComputeConfig = field(default_factory=StageComputeConfig)
    export: StageComputeConfig = field(default_factory=StageComputeConfig)

    def placements(self) -> dict:
        """{stage: compute.Placement}, every stage validated."""
        from flaxchat.compute import STAGES, ComputeError, placement
        try:
            return {s: placement(s, getattr(self, s), self.tpu_image, self.gpu_image) for s in STAGES}
        except ComputeError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class PipelineConfig:
    preset: str = "demo"
    seed: int = 42
    artifact_root: str = "./artifacts"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    sft: TrainConfig = field(default_factory=sft_defaults)
    rl: RLConfig = field(default_factory=RLConfig)
    grpo: TrainConfig = field(default_factory=grpo_defaults)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        """Rebuild a resolved tree (e.g. from a manifest); unknown keys are still errors."""
        cfg = cls()
        apply_overrides(cfg, data, allow_derived=True)
        return cfg


_DERIVED = {"model.n_embd", "model.n_head"}


def _closest(name: str, options: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if near:
        return f"; did you mean '{prefix}{near[0]}'?"
    return f"; valid keys: {', '.join(prefix + o for o in sorted(options))}"


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check/convert one leaf value against its annotation; strings from the CLI are parsed."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"internal: unsupported union type at {path}")
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{path}={value!r} has the wrong type: expected {getattr(hint, '__name__', hint)}")


def apply_overrides(node: Any, overrides: dict[str, Any], prefix: str = "", allow_derived: bool = False) -> None:
    """Merge a nested mapping into a dataclass tree in place, validating every key and type."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {type(overrides).__name__}")
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in dataclasses.fields(node)]
    for key, value in overrides.items():
        key = str(key).replace("-", "_")
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_closest(key, names, prefix)}")
        if path in _DERIVED and not allow_derived:
            raise ConfigError(f"'{path}' is derived from model.depth/aspect_ratio/head_dim; set those instead")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            apply_overrides(current, value, prefix=f"{path}.", allow_derived=allow_derived)
        else:
            setattr(node, key, _coerce(path, value, hints[key]))


def parse_dotted(items: list[str]) -> dict[str, Any]:
    """['model.depth=8', 'pretrain.num_steps=20'] -> nested dict (values stay strings; coerced later)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. model.depth=8)")
        dotted, value = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier value for '{p}'")
        node[parts[-1]] = value.strip()
    return out


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """Fill derived fields and check cross-field constraints. Idempotent."""
    from flaxchat.tokenizer_specials import SPECIAL_TOKENS  # tiny module, no heavy imports
    minimum = 256 + len(SPECIAL_TOKENS)
    if cfg.tokenizer.vocab_size < minimum:
        raise ConfigError(
            f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too small: it must be at least "
            f"{minimum} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = cfg.tokenizer.vocab_size
    elif cfg.model.vocab_size != cfg.tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} differs from tokenizer.vocab_size="
            f"{cfg.tokenizer.vocab_size}; leave model.vocab_size at 0 to follow the tokenizer")
    cfg.model.derive()
    if cfg.data.num_shards == -1:
        from flaxchat.plan import shards_needed   # needs the derived model; imports this module
        cfg.data.num_shards = shards_needed(cfg)
    elif cfg.data.num_shards < 2:
        raise ConfigError(f"data.num_shards={cfg.data.num_shards}: use >= 2 (training shards + the validation "
                          "shard) or -1 for as many as pretraining needs")
    for section in (cfg.pretrain, cfg.sft, cfg.grpo):
        if section.value_embedding_lr < 0:
            section.value_embedding_lr = section.embedding_lr / 2
    if cfg.tasks.source == "auto":
        cfg.tasks.source = "demo" if cfg.data.source == "demo" else "nanochat"
    if cfg.tasks.source not in ("demo", "nanochat"):
        raise ConfigError(f"tasks.source={cfg.tasks.source!r} must be 'demo', 'nanochat' or 'auto'")
    unknown = [f for f in cfg.export.format_list() if f not in EXPORT_FORMATS]
    if unknown or not cfg.export.format_list():
        raise ConfigError(f"export.formats={cfg.export.formats!r}: {'unknown format ' + repr(unknown[0]) if unknown else 'empty'}; "
                          f"choose a comma-separated subset of {', '.join(EXPORT_FORMATS)}")
    if cfg.export.source not in ("auto", "pretrain", "sft", "grpo"):
        raise ConfigError(f"export.source={cfg.export.source!r} must be auto, pretrain, sft or grpo")
    rl = cfg.rl
    if rl.prompts_per_step < 1 or rl.samples_per_prompt < 1 or rl.updates_per_batch < 1:
        raise ConfigError("rl.prompts_per_step, rl.samples_per_prompt and rl.updates_per_batch must be >= 1")
    if rl.samples_per_prompt == 1 and rl.advantage in ("grpo", "rloo"):
        raise ConfigError(f"rl.advantage={rl.advantage!r} compares samples within a group and needs "
                          f"rl.samples_per_prompt >= 2 (got 1); raise it or use rl.advantage=drgrpo")
    for name in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, name)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size}: use a positive size or -1 for 'the rest of the devices'")
    if sum(getattr(cfg.mesh, n) == -1 for n in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("only one of mesh.data/mesh.fsdp/mesh.tensor may be -1")
    if cfg.mesh.num_parallel < 1:
        raise ConfigError(f"mesh.num_parallel={cfg.mesh.num_parallel}: use 1 (one process) or the number of "
                          f"hosts to train on")
    cfg.compute.placements()
    return cfg


def build_config(preset: str = "demo", depth: int | None = None, overrides: dict[str, Any] | None = None,
                 dotted: list[str] | None = None, artifact_root: str | None = None) -> PipelineConfig:
    """The one way every entry point (flow, `python -m steps.X`, tests) builds its config."""
    from flaxchat.presets import preset_overrides
    cfg = PipelineConfig()
    apply_overrides(cfg, preset_overrides(preset))
    cfg.preset = preset
    if overrides:
        apply_overrides(cfg, overrides)
    if dotted:
        apply_overrides(cfg, parse_dotted(dotted))
    if depth is not None:
        cfg.model.depth = int(depth)
    if artifact_root:
        cfg.artifact_root = artifact_root
    return resolve(cfg)
