"""The training step's math: the modules (`model`), the jitted step and its state (`train_step`), the optimiser and
parameter groups (`optim`), the schedules, the sharding rules (one file) and the XLA options the step compiles
with. Pure: no files, no config parsing, no loop — `gpfm_jax.train` (the gpfm-train run) builds on this."""

from gpfm_jax.step.optim import (
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
from gpfm_jax.step.schedules import (
    ScheduleConfig,
    Schedules,
    make_schedules,
    peak_lr,
    schedule_values,
    warmup_cosine,
    zero_before,
)
