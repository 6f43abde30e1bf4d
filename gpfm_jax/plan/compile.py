"""Build, lower and compile exactly the training step `gpfm-train` runs for a config, on a target's devices.

The step is assembled by the run's own code (`gpfm_jax.train.assembly`: `resolve` then `assemble`), so the compiled
program is the trainer's. What differs is only where the inputs come from: state, batch and expert params are
ShapeDtypeStructs (nothing is allocated), the expert teachers are built from the registry at their real sizes (a
bundle holds exactly the registry architecture, so no bundle file is needed), and "auto" settings resolve for the
target's backend, not this machine's (bf16 compute, the target's attention implementation).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpfm_jax.data.batch import GLOBAL_CROPS, LOCAL_CROPS, MASKS, batch_spec
from gpfm_jax.encoders.teachers import STANDIN
from gpfm_jax.models.teachers import TEACHERS, build_teacher, standin_spec
from gpfm_jax.plan import targets as targets_lib
from gpfm_jax.plan.targets import Target
from gpfm_jax.step import sharding
from gpfm_jax.step.model import GPFMModel
from gpfm_jax.step.train_step import init_state
from gpfm_jax.train import assembly
from gpfm_jax.train import config as config_lib
from gpfm_jax.train.assembly import Resolved
from gpfm_jax.train.config_schema import TrainConfig, replace_fields

@dataclasses.dataclass
class Built:
    """The step for one (config, target, batch, remat) point, ready to trace / lower."""

    resolved: Resolved  # the config resolved for the target (dtypes, attention, derived step settings)
    target: Target
    model: GPFMModel
    tx: Any  # the optimiser
    step: Any  # gpfm_jax.step.train_step.ShardedStep
    args: tuple  # (state, batch, expert_params) as ShapeDtypeStructs
    per_device_batch: int
    mesh_shape: dict[str, int]
    param_bytes: dict[str, int]  # stored bytes of student / EMA teacher / experts (global)

    @property
    def cfg(self) -> TrainConfig:
        return self.resolved.cfg


@dataclasses.dataclass
class Compiled:
    built: Built
    traced: Any  # jax.stages.Traced (its .jaxpr is what runs, before partitioning)
    compiled: Any  # jax.stages.Compiled
    trace_s: float
    compile_s: float


def plan_config(cfg: TrainConfig, target: Target, per_device_batch: int | None = None,
                remat: str | None = None, standin_teachers: bool = False) -> TrainConfig:
    """`cfg` with the planner's changes: global batch = per-device batch x chips, all target devices, a remat
    policy, stand-in teachers. What "auto" means on the target is `assembly.resolve`'s, as for a run."""
    changes: dict[str, Any] = {"mesh.num_devices": 0}
    if remat is not None:
        changes["compute.remat_policy"] = remat
    if per_device_batch is not None:
        changes["data.global_batch_size"] = int(per_device_batch) * target.chips
    if standin_teachers:
        changes["teachers"] = {name: STANDIN for name in cfg.teachers}
    return replace_fields(cfg, changes)


def abstract_experts(r: Resolved) -> tuple[dict, dict]:
    """({name: Teacher}, {name: param ShapeDtypeStructs}) built as `gpfm_jax.train.config.load_experts` builds them
    (same `teacher_overrides`), from the registry (or the stand-in spec for "standin") without reading any file: a
    bundle holds exactly the registry architecture."""
    overrides = config_lib.teacher_overrides(r.cfg, r.backend)
    param_dtype = overrides["param_dtype"]
    teachers, params = {}, {}
    for name, bundle in r.cfg.teachers.items():
        if bundle == STANDIN:
            spec = standin_spec(name, **dataclasses.asdict(r.cfg.standin)).replace(fixed_input_size=None)
        else:
            spec = TEACHERS[name]
        teacher = build_teacher(spec, **overrides)
        size = spec.fixed_input_size or 224
        images = jax.ShapeDtypeStruct((1, size, size, spec.vit.in_chans), jnp.float32)
        shapes = nn.meta.unbox(jax.eval_shape(teacher.module.init, jax.random.key(0), images))["params"]
        teachers[name] = teacher
        params[name] = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(param_dtype)), shapes)
    return teachers, params


def _nbytes(tree: Any) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def build(cfg: TrainConfig, target: Target, per_device_batch: int | None = None,
          remat: str | None = None, standin_teachers: bool = False, devices: list | None = None) -> Built:
    """The sharded step for the target, assembled as gpfm-train assembles it (`train/assembly.py`), and its abstract
    arguments. The config's numbers are checked for the target's chips and hosts; no file is read."""
    cfg = plan_config(cfg, target, per_device_batch, remat, standin_teachers)
    resolved = assembly.resolve(cfg, target.chips, target.hosts, target.backend)
    devices = targets_lib.devices(target) if devices is None else devices
    teachers, expert_params = abstract_experts(resolved)
    built = assembly.assemble(resolved, devices, teachers, expert_params)
    state = built.abstract_state
    param_bytes = {"student": _nbytes(state.params), "ema_teacher": _nbytes(state.teacher),
                   "experts": _nbytes(expert_params)}
    batch = batch_spec(resolved.data, resolved.vit.patch_size, resolved.global_batch_size)
    return Built(resolved, target, built.model, built.tx, built.step, (state, batch, expert_params),
                 cfg.data.global_batch_size // target.chips, dict(built.mesh.shape), param_bytes)


def compile_built(built: Built) -> Compiled:
    """Trace (the jaxpr the FLOP count reads), lower and compile for the target; the jitted step carries the XLA
    options gpfm-train compiles with on that platform (`gpfm_jax.step.xla_options`)."""
    t0 = time.perf_counter()
    with jax.set_mesh(built.step.mesh):
        traced = built.step.jitted.trace(*built.args)
        t1 = time.perf_counter()
        compiled = traced.lower().compile()
    t2 = time.perf_counter()
    return Compiled(built, traced, compiled, t1 - t0, t2 - t1)


def materialize(built: Built, seed: int = 0) -> tuple[Any, dict[str, jax.Array], dict[str, Any]]:
    """Real arrays for the built step, made on the devices in their shardings: a fresh train state, random expert
    weights and one random batch (random pixels in the crop dtype, a third of the patches masked). For timing the step
    (tools/device_check.py); the numbers mean nothing."""
    state_abs, batch_abs, experts_abs = built.args
    mesh = built.step.mesh
    state_sh = sharding.state_shardings(state_abs, mesh)
    key = jax.random.key(seed)
    state = jax.jit(lambda k: init_state(built.model, built.tx, k), out_shardings=state_sh)(key)

    def init_experts(k):
        out = {}
        for i, (name, teacher) in enumerate(built.model.experts.items()):
            spec = teacher.spec
            size = spec.fixed_input_size or 224
            images = jnp.zeros((1, size, size, spec.vit.in_chans), jnp.float32)
            params = nn.meta.unbox(teacher.module.init(jax.random.fold_in(k, i), images))["params"]
            out[name] = jax.tree_util.tree_map(lambda p, a: p.astype(a.dtype), params, experts_abs[name])
        return out

    experts = jax.jit(init_experts, out_shardings=sharding.state_shardings(experts_abs, mesh))(key)
    batch_sh = sharding.batch_sharding(mesh)

    def crops(k, x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jax.random.randint(k, x.shape, 0, 256, jnp.int32).astype(x.dtype)
        return jax.random.normal(k, x.shape, x.dtype)

    def make_batch(k):
        kg, kl, km = jax.random.split(k, 3)
        return {GLOBAL_CROPS: crops(kg, batch_abs[GLOBAL_CROPS]), LOCAL_CROPS: crops(kl, batch_abs[LOCAL_CROPS]),
                MASKS: jax.random.bernoulli(km, 1 / 3, batch_abs[MASKS].shape)}

    batch = jax.jit(make_batch, out_shardings={k: batch_sh for k in batch_abs})(jax.random.fold_in(key, 1))
    return state, batch, experts
