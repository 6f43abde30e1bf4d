"""The training step, assembled in one place for every caller.

gpfm-train (`train/loop.py`), gpfm-plan (`plan/compile.py`) and the speed scripts (`tools/`) all go through the same
two calls, so the program a plan compiles is the program a run executes:

    resolved = resolve(cfg, num_devices, process_count, backend)   # the config's numbers checked, "auto"/0 resolved
    built = assemble(resolved, devices, teachers, expert_params)   # mesh, model, optimiser, state shapes, jitted step

`resolve` touches no file (the paths are `config.check_paths`'s, which only the run calls), so the planner needs no
stand-in teacher or fake data path to get past it. Everything the run derives from the config, the device count and
the backend is computed here once and recorded as is (`Resolved.summary`, config_resolved.json). The expert teachers
are real (the run: `config.load_experts`) or abstract (the planner: `plan.compile.abstract_experts`); both build
their modules with `config.teacher_overrides`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from gpfm_jax.models.vit import ViTConfig
from gpfm_jax.step import sharding
from gpfm_jax.step.model import GPFMModel
from gpfm_jax.step.optim import make_optimizer
from gpfm_jax.step.schedules import Schedules, make_schedules, peak_lr
from gpfm_jax.step.train_step import ShardedStep, StepConfig, init_state, jit_train_step, make_train_step
from gpfm_jax.train import config as config_lib
from gpfm_jax.train.config_schema import DataConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A config with everything derived from it for `num_devices` devices on `process_count` processes of
    `backend`: made once by `resolve`, read by the rest of the run, written as is to config_resolved.json."""

    cfg: TrainConfig  # as given (config.json)
    backend: str
    num_devices: int
    process_count: int
    compute_dtype: str  # "auto" resolved for the backend
    teacher_dtypes: tuple[str, str]  # (compute, params) of the expert teachers
    vit: ViTConfig  # the student: compute dtype, scan, remat applied
    step: StepConfig  # batch_groups, max_masked, shard_max_masked, crops derived
    data: DataConfig  # config.data as the host pipeline takes it (masking grid set)
    data_shards: int
    end_step: int
    peak_lr: float

    @property
    def global_batch_size(self) -> int:
        return self.cfg.data.global_batch_size

    def summary(self, **extra: Any) -> dict[str, Any]:
        """config_resolved.json: the derived values (the config itself is config.json), plus `extra`."""
        return {"backend": self.backend, "process_count": self.process_count, "devices": self.num_devices,
                "compute_dtype": self.compute_dtype, "teacher_dtypes": list(self.teacher_dtypes),
                "max_masked": self.step.max_masked, "shard_max_masked": list(self.step.shard_max_masked),
                "batch_groups": self.step.batch_groups, "data_shards": self.data_shards, "end_step": self.end_step,
                "peak_lr": self.peak_lr, "attention_impl": self.vit.attention_impl, **extra}


def resolve(cfg: TrainConfig, num_devices: int, process_count: int, backend: str) -> Resolved:
    """Checks the config's numbers for this many devices and processes (`config.check_numbers`: ConfigError naming
    the field) and resolves every derived setting once."""
    config_lib.check_numbers(cfg, num_devices=num_devices, process_count=process_count)
    dtype = config_lib.compute_dtype(cfg, backend)
    vit = config_lib.vit_config(cfg, backend)
    return Resolved(
        cfg=cfg, backend=backend, num_devices=num_devices, process_count=process_count, compute_dtype=dtype,
        teacher_dtypes=config_lib.teacher_dtypes(cfg, backend), vit=vit,
        step=config_lib.step_config(cfg, num_devices=num_devices, process_count=process_count),
        data=config_lib.data_config(cfg), data_shards=config_lib.num_shards(cfg, process_count),
        end_step=config_lib.total_steps(cfg), peak_lr=peak_lr(cfg.schedule, cfg.data.global_batch_size))


@dataclasses.dataclass
class Assembly:
    """The step for one resolved config on one set of devices, and what it was built from."""

    resolved: Resolved
    mesh: Any
    model: GPFMModel
    schedules: Schedules
    tx: Any  # the optimiser
    abstract_state: Any  # the TrainState as ShapeDtypeStructs
    shardings: Any  # the state's NamedShardings
    step: ShardedStep  # jitted with those shardings; call it or `.lower()` it
    expert_params: Any  # arrays (a run) or ShapeDtypeStructs (a plan)

    def param_count(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(self.abstract_state.params)))

    def init(self, root: jax.Array) -> Any:
        """A fresh TrainState made directly in its shardings."""
        return jax.jit(lambda k: init_state(self.model, self.tx, k), out_shardings=self.shardings)(root)


def assemble(r: Resolved, devices: list, teachers: dict[str, Any], expert_params: dict[str, Any]) -> Assembly:
    """Mesh, model, schedules, optimiser, abstract state, its shardings and the jitted step. Nothing is allocated:
    the state is only shaped (`Assembly.init` makes it)."""
    c = r.cfg
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices=devices)
    model = GPFMModel(r.vit, c.model.heads, teachers)
    schedules = make_schedules(c.schedule, r.global_batch_size)
    tx = make_optimizer(jax.eval_shape(model.init_student, jax.random.key(0)), schedules, c.optim)
    abstract_state = jax.eval_shape(lambda k: init_state(model, tx, k), jax.random.key(c.seed))
    step = jit_train_step(make_train_step(model, schedules, tx, r.step), mesh, abstract_state, expert_params)
    return Assembly(r, mesh, model, schedules, tx, abstract_state, sharding.state_shardings(abstract_state, mesh),
                    step, expert_params)
