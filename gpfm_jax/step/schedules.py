"""Per-step schedules of GPFM training as optax-style schedules (pure functions of the step).

All follow DINOv2's `CosineScheduler` exactly, indexed by the 0-based iteration:
  [0, freeze)                 -> 0
  [freeze, freeze + warmup)   -> np.linspace(start, base, warmup)   (endpoint included: base at warmup - 1)
  [freeze + warmup, total)    -> final + (base - final) / 2 * (1 + cos(pi * k / (total - warmup - freeze)))
  >= total                    -> final
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.Array | int], jax.Array]


def warmup_cosine(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_value: float = 0.0,
    freeze_steps: int = 0,
) -> Schedule:
    """DINOv2 CosineScheduler as a jittable function of the step."""
    cosine_len = total_steps - warmup_steps - freeze_steps
    if cosine_len < 0:
        raise ValueError(f"warmup {warmup_steps} + freeze {freeze_steps} exceed total {total_steps}")

    def schedule(step: jax.Array | int) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        w = t - freeze_steps
        if warmup_steps > 1:
            warm = start_value + (base - start_value) * w / (warmup_steps - 1)
        else:
            warm = jnp.full_like(t, start_value)
        k = t - freeze_steps - warmup_steps
        cos = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * k / max(cosine_len, 1)))
        value = jnp.where(k < 0, warm, cos)
        value = jnp.where(t < freeze_steps, 0.0, value)
        return jnp.where(t >= total_steps, final, value)

    return schedule


def zero_before(schedule: Schedule, steps: int) -> Schedule:
    """The schedule, but 0 for the first `steps` iterations (DINOv2's frozen last layer)."""

    def frozen(step: jax.Array | int) -> jax.Array:
        return jnp.where(jnp.asarray(step) < steps, 0.0, schedule(step))

    return frozen


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Every number of SPEC's schedules; defaults = GPFM ViT-L."""

    base_lr: float = 4e-4  # at reference_batch_size; scaled by sqrt(global_batch / reference_batch_size)
    reference_batch_size: int = 1024
    min_lr: float = 1e-6
    total_steps: int = 500_000
    warmup_steps: int = 50_000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_steps: int = 37_500
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    freeze_last_layer_steps: int = 1_250


class Schedules(NamedTuple):
    lr: Schedule
    last_layer_lr: Schedule
    weight_decay: Schedule
    teacher_temp: Schedule
    momentum: Schedule


def peak_lr(cfg: ScheduleConfig, global_batch_size: int) -> float:
    """DINOv2's square-root scaling rule: base_lr * sqrt(global_batch / 1024)."""
    return cfg.base_lr * math.sqrt(global_batch_size / cfg.reference_batch_size)


def make_schedules(cfg: ScheduleConfig, global_batch_size: int) -> Schedules:
    lr = warmup_cosine(peak_lr(cfg, global_batch_size), cfg.min_lr, cfg.total_steps, cfg.warmup_steps)
    return Schedules(
        lr=lr,
        last_layer_lr=zero_before(lr, cfg.freeze_last_layer_steps),
        weight_decay=warmup_cosine(cfg.weight_decay, cfg.weight_decay_end, cfg.total_steps),
        teacher_temp=warmup_cosine(
            cfg.teacher_temp, cfg.teacher_temp, cfg.teacher_temp_warmup_steps, cfg.teacher_temp_warmup_steps,
            start_value=cfg.teacher_temp_start,
        ),
        momentum=warmup_cosine(cfg.momentum_teacher, cfg.final_momentum_teacher, cfg.total_steps),
    )


def schedule_values(schedules: Schedules, step: jax.Array | int) -> dict[str, jax.Array]:
    """All schedule values at `step`, for the step's metrics ("schedule/lr", ...)."""
    return {f"schedule/{name}": fn(step) for name, fn in schedules._asdict().items()}
