"""nanochat's per-step schedules, as jit-safe functions of the optimizer's own step counter.

nanochat (scripts/base_train.py) recomputes three numbers on the host before every
`optimizer.step()` from the 0-based step index `it`:

- LR multiplier, applied to every group (AdamW and Muon): linear warmup `(it+1)/warmup`,
  then flat 1.0, then a linear warmdown over the last `round(warmdown_ratio * N)` steps
  from 1.0 to `final_lr_frac` (reaching it at `it == N`); the whole curve times `init_lr_frac`
  (1 in pretraining; nanochat's SFT and RL scale their initial LRs by 0.8 and 0.05).
- Muon momentum: 0.85 -> 0.97 linearly over the first 400 steps, flat 0.97, then
  0.97 -> 0.90 linearly across the LR warmdown window. The warmup branch wins when
  the two windows overlap (short runs), exactly like nanochat's if/elif.
- Muon weight-decay multiplier: cosine from 1 to 0 over the whole run,
  `0.5 * (1 + cos(pi * it / N))`.

Here the step index is the `count` stored in the optimizer state (so resume-from-checkpoint
restores the schedule position for free) and every function is branch-free `jnp.where` math.
They accept Python ints too, which is what the tests and logging use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


class ScheduleError(ValueError):
    """A schedule parameter is out of range; the message names it and the valid range."""


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Static schedule parameters (hashable, baked into the compiled update)."""
    num_steps: int
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    momentum_warmup_steps: int = 400
    momentum_start: float = 0.85
    momentum_peak: float = 0.97
    momentum_end: float = 0.90
    init_lr_frac: float = 1.0       # scales the whole LR curve (nanochat's SFT/RL start below pretraining)

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ScheduleError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.warmup_steps < 0:
            raise ScheduleError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmdown_ratio <= 1.0:
            raise ScheduleError(f"warmdown_ratio must be in [0, 1], got {self.warmdown_ratio}")
        if self.momentum_warmup_steps < 0:
            raise ScheduleError(f"momentum_warmup_steps must be >= 0, got {self.momentum_warmup_steps}")

    @classmethod
    def from_train(cls, train_cfg: Any, num_steps: int) -> "ScheduleConfig":
        """The schedule a training stage's config asks for (one place maps the knobs)."""
        return cls(num_steps=num_steps, warmup_steps=train_cfg.warmup_steps,
                   warmdown_ratio=train_cfg.warmdown_ratio, final_lr_frac=train_cfg.final_lr_frac,
                   momentum_warmup_steps=train_cfg.momentum_warmup_steps,
                   momentum_start=train_cfg.momentum_start, momentum_peak=train_cfg.momentum_peak,
                   momentum_end=train_cfg.momentum_end, init_lr_frac=train_cfg.init_lr_frac)

    @property
    def warmdown_steps(self) -> int:
        # Python's round (half to even), as nanochat computes it on the host
        return int(round(self.warmdown_ratio * self.num_steps))

    @property
    def warmdown_start(self) -> int:
        return self.num_steps - self.warmdown_steps


def _as_float(step: jax.Array | int) -> jax.Array:
    return jnp.asarray(step).astype(jnp.float32)


def lr_multiplier(step: jax.Array | int, cfg: ScheduleConfig) -> jax.Array:
    """LR multiplier at 0-based step `step` (float32 scalar)."""
    it = _as_float(step)
    warmup = jnp.float32(max(cfg.warmup_steps, 1))
    warmdown = jnp.float32(max(cfg.warmdown_steps, 1))   # unused branch when warmdown_steps == 0
    warm = (it + 1.0) / warmup
    progress = (cfg.num_steps - it) / warmdown
    down = progress + (1.0 - progress) * cfg.final_lr_frac
    curve = jnp.where(it < cfg.warmup_steps, warm, jnp.where(it <= cfg.warmdown_start, jnp.float32(1.0), down))
    return (cfg.init_lr_frac * curve).astype(jnp.float32)


def muon_momentum(step: jax.Array | int, cfg: ScheduleConfig) -> jax.Array:
    """Muon momentum coefficient at 0-based step `step` (float32 scalar)."""
    it = _as_float(step)
    frac = it / jnp.float32(max(cfg.momentum_warmup_steps, 1))
    warm = (1.0 - frac) * cfg.momentum_start + frac * cfg.momentum_peak
    progress = (it - cfg.warmdown_start) / jnp.float32(max(cfg.warmdown_steps, 1))
    down = cfg.momentum_peak * (1.0 - progress) + cfg.momentum_end * progress
    return jnp.where(it < cfg.momentum_warmup_steps, warm,
                     jnp.where(it >= cfg.warmdown_start, down, jnp.float32(cfg.momentum_peak))
                     ).astype(jnp.float32)


def weight_decay_multiplier(step: jax.Array | int, cfg: ScheduleConfig) -> jax.Array:
    """Muon weight-decay multiplier at 0-based step `step`: cosine from 1 to 0 over the run."""
    it = _as_float(step)
    return (0.5 * (1.0 + jnp.cos(math.pi * it / cfg.num_steps))).astype(jnp.float32)
