"""The run's plan, made in the flow's start step before anything heavy happens.

For the resolved config it works out what each stage will do (parameters, tokens, optimizer steps,
global batch) and where it runs, then estimates wall time and cost from nanochat's FLOPs per token
(flaxchat.model.flops), the target hardware's peak FLOP/s and a stated MFU assumption. A run the
hardware cannot finish in reasonable time (a d24 pretrain on a laptop CPU) is stopped here with that
estimate, before a tokenizer is trained or a shard downloaded.

Estimates, not measurements: pretraining is exact in FLOPs (steps x batch x FLOPs/token); SFT and
GRPO sizes depend on data that is only loaded later, so they use the conversation/problem counts
the config names and the per-item token assumptions below, each printed with the plan.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

from flaxchat.compute import STAGES
from flaxchat.config import ConfigError, PipelineConfig
from flaxchat.model import flops
from flaxchat.optim.scaling import plan_training

# Stated assumptions (printed with every plan).
ACCELERATOR_MFU = 0.40      # nanochat measures ~41% at d12 and ~50% at d24 on H100 (bf16)
CPU_EFFICIENCY = 0.50       # training step FLOP/s / this machine's measured fp32 matmul FLOP/s
                            # (flaxchat at nanochat's runcpu config on 2 cores: ~0.5)
SFT_TOKENS_PER_CONVERSATION = 512
GRPO_PROMPT_TOKENS = 160
# nanochat's task sizes (HF datasets): SmolTalk train, MMLU auxiliary_train, GSM8K train.
NANOCHAT_SFT_CONVERSATIONS = {"smoltalk": 460_341, "mmlu_aux": 99_842, "gsm8k": 7_473}
NANOCHAT_RL_PROBLEMS = 7_473
# On-demand list prices, USD per chip-hour (GCP us-central1, 2026); edit for your contract.
PRICE_PER_CHIP_HOUR = {"v4": 3.22, "v5e": 1.20, "v5p": 4.20, "v6e": 2.70,
                       "a100": 3.67, "h100": 11.06, "h200": 10.60}
# Pretraining data needed (data.num_shards = -1): nanochat's ClimbMix shards hold ~250M characters
# (speedrun.sh: "the first ~2B characters" = 8 shards); its tokenizer gives ~4.8 chars/token; best-fit
# packing crops ~35% of tokens at T=2048. d24 at ratio 8 -> ~171 shards (nanochat downloads 170).
CHARS_PER_SHARD = 250e6
CHARS_PER_TOKEN = 4.8
CROPPED_FRACTION = 0.35


class PlanError(ValueError):
    """The run would take too long where it is set to run; the message names the override."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str                        # e.g. "cpu (2 cores, 95 GFLOP/s fp32 matmul)", "TPU v5p 2x2x4"
    chips: int
    peak_flops: float                # per chip
    efficiency: float                # fraction of peak a training step reaches (the MFU assumption)
    price_per_chip_hour: float | None
    local: bool

    @property
    def flops_per_s(self) -> float:
        return self.chips * self.peak_flops * self.efficiency


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: str
    where: str
    tokens: int | None               # tokens trained on (None: not a training stage)
    steps: int | None
    global_batch: int | None         # tokens per optimizer step
    flops: float | None
    hours: float | None
    cost_usd: float | None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    depth: int
    params: int
    scaling_params: int
    flops_per_token: int
    stages: tuple[StagePlan, ...]
    assumptions: tuple[str, ...]

    @property
    def hours(self) -> float:
        return sum(s.hours or 0.0 for s in self.stages)

    @property
    def cost_usd(self) -> float | None:
        costs = [s.cost_usd for s in self.stages if s.hours]
        return None if any(c is None for c in costs) else sum(costs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"hours": self.hours, "cost_usd": self.cost_usd}

    def table(self) -> str:
        head = (f"plan: d{self.depth}, {self.params / 1e6:,.1f}M parameters ({self.scaling_params / 1e6:,.1f}M "
                f"scaling), {self.flops_per_token / 1e9:.3f} GFLOP/token")
        rows = [f"{'stage':<10} {'where':<38} {'tokens':>10} {'steps':>7} {'batch':>9} {'hours':>9} {'cost $':>9}"]
        for s in self.stages:
            rows.append(f"{s.stage:<10} {s.where[:38]:<38} {_num(s.tokens):>10} {_num(s.steps):>7} "
                        f"{_num(s.global_batch):>9} {_hours(s.hours):>9} {_money(s.cost_usd):>9}"
                        + (f"  {s.note}" if s.note else ""))
        total = f"total: {_hours(self.hours)} h, {_money(self.cost_usd)} USD"
        return "\n".join([head, *rows, total, *("assumes: " + a for a in self.assumptions)])


def _num(v: int | None) -> str:
    if v is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= size:
            return f"{v / size:.1f}{unit}"
    return str(v)


def _hours(h: float | None) -> str:
    return "-" if h is None else (f"{h:.2f}" if h < 100 else f"{h:,.0f}")


def _money(c: float | None) -> str:
    return "-" if c is None else f"{c:,.2f}"


def measure_cpu_matmul_flops(size: int = 768, reps: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s through XLA (median of `reps` jitted size^3 products, ~0.1 s)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((size, size), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / sorted(times)[len(times) // 2]


def local_hardware() -> Hardware:
    """The devices this process sees: accelerators by their peak table, CPUs by a quick measurement."""
    import jax
    devices = jax.devices()
    kind = devices[0].device_kind
    peak = flops.peak_bf16_flops(kind)
    if devices[0].platform != "cpu" and peak:
        return Hardware(f"local {len(devices)}x {kind}", len(devices), peak, ACCELERATOR_MFU,
                        _price(kind), local=True)
    measured = measure_cpu_matmul_flops()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Hardware(f"local cpu ({cores} cores, {measured / 1e9:.0f} GFLOP/s matmul)", 1, measured,
                    CPU_EFFICIENCY, None, local=True)


# bf16 dense peak per chip for the compute section's names (flaxchat.compute's TPU and GPU types)
TPU_PEAK = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
GPU_PEAK = {"t4": 65e12, "l4": 121e12, "a100": 312e12, "a100-80gb": 312e12, "h100": 989e12, "h100-mega": 989e12,
            "h200": 989e12, "b200": 2250e12}
GPU_PRICE_KEY = {"a100": "a100", "a100-80gb": "a100", "h100": "h100", "h100-mega": "h100", "h200": "h200"}


def stage_hardware(cfg: PipelineConfig) -> dict[str, Hardware]:
    """Where each stage runs, from the config's `compute` section (flaxchat.compute validates it)."""
    from flaxchat import compute
    local = None
    out = {}
    for stage in STAGES:
        spec = getattr(cfg.compute, stage)
        if spec.kind == "tpu":
            sl = compute.tpu_slice(spec.type, spec.topology)
            name = sl.type.name
            out[stage] = Hardware(f"TPU {name} {sl.topology} ({sl.chips} chips, {sl.hosts} hosts)", sl.chips,
                                  TPU_PEAK[name], ACCELERATOR_MFU, PRICE_PER_CHIP_HOUR.get(name), local=False)
        elif spec.kind == "gpu":
            gpu = spec.type.lower()
            price = PRICE_PER_CHIP_HOUR.get(GPU_PRICE_KEY.get(gpu, ""))
            out[stage] = Hardware(f"{spec.count}x {gpu} GPU", spec.count, GPU_PEAK.get(gpu, 0.0) or float("nan"),
                                  ACCELERATOR_MFU, price, local=False)
        else:
            local = local or local_hardware()
            out[stage] = local
    return out


def _price(kind: str) -> float | None:
    low = kind.lower().replace(" ", "")
    for key in ("h200", "h100", "a100", "v5p", "v6e", "v4"):
        if key in low:
            return PRICE_PER_CHIP_HOUR[key]
    if "v5lite" in low or "v5e" in low:
        return PRICE_PER_CHIP_HOUR["v5e"]
    return None


def _timed(stage: str, where: Hardware, tokens: int | None, steps: int | None, batch: int | None,
           total_flops: float | None, note: str = "") -> StagePlan:
    hours = None if total_flops is None else total_flops / where.flops_per_s / 3600
    cost = None if hours is None or where.price_per_chip_hour is None else hours * where.chips * where.price_per_chip_hour
    return StagePlan(stage, where.name, tokens, steps, batch, total_flops, hours, cost, note)


def _sft_conversations(cfg: PipelineConfig) -> int:
    t = cfg.tasks
    if t.source == "demo":
        return t.demo_conversations + t.demo_problems
    n = NANOCHAT_SFT_CONVERSATIONS
    return n["smoltalk"] + t.mmlu_epochs * n["mmlu_aux"] + t.gsm8k_epochs * n["gsm8k"]


def shards_needed(cfg: PipelineConfig) -> int:
    """Training shards that cover pretraining's tokens, plus the pinned validation shard."""
    pt = plan_training(cfg.pretrain, cfg.model, 1)
    chars = pt.num_steps * pt.total_batch_size * CHARS_PER_TOKEN / (1 - CROPPED_FRACTION)
    return math.ceil(chars / CHARS_PER_SHARD) + 1


def make_plan(cfg: PipelineConfig, hardware: dict[str, Hardware]) -> RunPlan:
    """The plan for a resolved config; `hardware` says where each stage in STAGES runs."""
    missing = [s for s in STAGES if s not in hardware]
    if missing:
        raise ConfigError(f"no hardware given for stage(s) {', '.join(missing)}")
    m = cfg.model
    counts = flops.param_counts(m)
    per_token = flops.estimate_flops(m)
    n_matmul = flops.num_matmul_params(m)
    pt = plan_training(cfg.pretrain, m, 1)   # steps and batch do not depend on the device count
    pt_tokens = pt.num_steps * pt.total_batch_size
    stages = [_timed("tokenizer", hardware["tokenizer"], None, None, None, None,
                     f"BPE on {_num(cfg.tokenizer.max_chars)} chars (CPU-bound; not estimated)"),
              _timed("pretrain", hardware["pretrain"], pt_tokens, pt.num_steps, pt.total_batch_size,
                     float(pt_tokens) * per_token)]

    sft_batch = max(cfg.sft.total_batch_size, cfg.sft.device_batch_size * m.sequence_len)
    if cfg.sft.num_steps > 0:
        sft_tokens, note = cfg.sft.num_steps * sft_batch, ""
    else:
        sft_tokens = _sft_conversations(cfg) * SFT_TOKENS_PER_CONVERSATION
        note = f"1 epoch of ~{_sft_conversations(cfg):,} conversations"
    stages.append(_timed("sft", hardware["sft"], sft_tokens, max(1, sft_tokens // sft_batch), sft_batch,
                         float(sft_tokens) * per_token, note))

    rl = cfg.rl
    problems = rl.num_epochs * (cfg.tasks.demo_problems if cfg.tasks.source == "demo" else NANOCHAT_RL_PROBLEMS)
    rounds = cfg.grpo.num_steps // rl.updates_per_batch if cfg.grpo.num_steps > 0 \
        else max(1, problems // rl.prompts_per_step)
    sequences = rounds * rl.prompts_per_step * rl.samples_per_prompt
    seq_tokens = GRPO_PROMPT_TOKENS + rl.max_new_tokens
    # sampling costs a forward (2N/token); each update a forward+backward (6N/token) over the rollouts
    grpo_flops = sequences * seq_tokens * (2 * n_matmul + rl.updates_per_batch * per_token)
    stages.append(_timed("grpo", hardware["grpo"], sequences * seq_tokens, rounds * rl.updates_per_batch,
                         rl.prompts_per_step * rl.samples_per_prompt * seq_tokens, float(grpo_flops),
                         f"{rounds} rounds of {rl.prompts_per_step}x{rl.samples_per_prompt} samples"))
    stages.append(_timed("eval", hardware["eval"], None, None, None, None, "CORE + chat tasks (not estimated)"))
    stages.append(_timed("export", hardware["export"], None, None, None, None, "conversion + parity (minutes)"))
    used = {h.name: h for h in hardware.values()}.values()
    assumptions = tuple(
        f"{h.name}: {h.chips} x {h.peak_flops / 1e12:.2f} TFLOP/s at {h.efficiency:.0%} "
        + ("of peak (MFU)" if not h.name.startswith("local cpu") else "of measured matmul throughput")
        + (f", ${h.price_per_chip_hour}/chip-hour" if h.price_per_chip_hour else ", no price") for h in used)
    assumptions += (f"SFT {SFT_TOKENS_PER_CONVERSATION} tokens/conversation; GRPO {GRPO_PROMPT_TOKENS} "
                    f"prompt tokens + {rl.max_new_tokens} sampled per sequence",)
    return RunPlan(m.depth, counts["total"], counts["transformer_matrices"] + counts["lm_head"], per_token,
                   tuple(stages), assumptions)


def check_feasible(plan: RunPlan, hardware: dict[str, Hardware], max_hours: float) -> None:
    """Stop a run whose stages on THIS machine would take longer than `max_hours` (0 = no limit)."""
    if max_hours <= 0:
        return
    slow = [s for s in plan.stages if s.hours and hardware[s.stage].local and s.hours > max_hours]
    if slow:
        worst = max(slow, key=lambda s: s.hours)
        raise PlanError(
            f"{worst.stage} would take about {_hours(worst.hours)} hours on {worst.where} (d{plan.depth}, "
            f"{_num(worst.tokens)} tokens): run it on a TPU/GPU (the compute section), pick a smaller --depth "
            f"or --preset demo, or pass --max-hours 0 to run anyway")

