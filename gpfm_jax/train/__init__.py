"""Training: schedules and optimiser (this package also hosts the train state, step and sharding)."""

from gpfm_jax.train.optim import (
    OptimConfig,
    clip_modules_by_norm,
    ema_update,
    grad_norms,
    last_layer_mask,
    lr_multipliers,
    make_optimizer,
    scale_by_schedules,
    weight_decay_mask,
)
from gpfm_jax.train.schedules import (
    ScheduleConfig,
    Schedules,
    make_schedules,
    peak_lr,
    schedule_values,
    warmup_cosine,
    zero_before,
)
