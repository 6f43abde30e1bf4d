"""Build, lower and compile exactly the training step `gpfm-train` runs for a config, on a target's devices.

The run's own builders make every piece (`gpfm_jax.train.config`: the ViT / head / schedule / optimiser / step
configs; `gpfm_jax.step.train_step`: `make_train_step` + `jit_train_step` with the FSDP shardings), so the compiled
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

from gpfm_jax.encoders.teachers import STANDIN
from gpfm_jax.models import attention
from gpfm_jax.models.teachers import TEACHERS, build_teacher, standin_spec
from gpfm_jax.plan import targets as targets_lib
from gpfm_jax.plan.targets import Target
from gpfm_jax.step import sharding
from gpfm_jax.step.model import GPFMModel
from gpfm_jax.step.optim import make_optimizer
from gpfm_jax.step.schedules import make_schedules
from gpfm_jax.step.train_step import init_state, jit_train_step, make_train_step
from gpfm_jax.train import config as config_lib
from gpfm_jax.train.config_schema import TrainConfig, replace_fields

@dataclasses.dataclass
class Built:
    """The step for one (config, target, batch, remat) point, ready to trace / lower."""

    cfg: TrainConfig  # resolved for the target
    target: Target
    model: GPFMModel
    tx: Any  # the optimiser
    step: Any  # gpfm_jax.step.train_step.ShardedStep
    args: tuple  # (state, batch, expert_params) as ShapeDtypeStructs
    per_device_batch: int
    mesh_shape: dict[str, int]
    param_bytes: dict[str, int]  # stored bytes of student / EMA teacher / experts (global)


@dataclasses.dataclass
class Compiled:
    built: Built
    traced: Any  # jax.stages.Traced (its .jaxpr is what runs, before partitioning)
    compiled: Any  # jax.stages.Compiled
    trace_s: float
    compile_s: float


def resolve_config(cfg: TrainConfig, target: Target, per_device_batch: int | None = None,
                   remat: str | None = None, standin_teachers: bool = False) -> TrainConfig:
    """`cfg` with the target's resolutions made explicit: compute dtype (bf16 on accelerators unless the config sets
    one), attention implementation, global batch = per-device batch x chips, all target devices."""
    dtype = config_lib.compute_dtype(cfg, backend=target.backend)
    changes: dict[str, Any] = {
        "compute.dtype": dtype,
        "model.vit.attention_impl": attention.resolve_impl(cfg.model.vit.attention_impl, target.backend, dtype),
        "mesh.num_devices": 0,
    }
    if remat is not None:
        changes["compute.remat_policy"] = remat
    if per_device_batch is not None:
        changes["data.global_batch_size"] = int(per_device_batch) * target.chips
    if standin_teachers:
        changes["teachers"] = {name: STANDIN for name in cfg.teachers}
    return replace_fields(cfg, changes)


def _validate(cfg: TrainConfig, target: Target) -> None:
    """gpfm-train's config checks for the target's device and host counts, minus the ones about files on this
    machine (teacher bundles, data, init_from): the plan needs none of them."""
    probe = replace_fields(cfg, {"teachers": {name: STANDIN for name in cfg.teachers}, "data.source": "folder",
                                 "data.path": ".", "init_from": ""})
    config_lib.validate(probe, num_devices=target.chips, process_count=target.hosts)


def abstract_experts(cfg: TrainConfig, target: Target) -> tuple[dict, dict]:
    """({name: Teacher}, {name: param ShapeDtypeStructs}) built as `gpfm_jax.train.config.load_experts` builds them,
    from the registry (or the stand-in spec for "standin") without reading any file."""
    dtype, param_dtype = config_lib.teacher_dtypes(cfg, backend=target.backend)
    impl = attention.resolve_impl(attention.AUTO, target.backend, dtype)
    overrides = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=bool(cfg.compute.scan_layers),
                     attention_impl=impl)
    teachers, params = {}, {}
    for name, bundle in cfg.teachers.items():
        if bundle == STANDIN:
            spec = standin_spec(name, **dataclasses.asdict(cfg.standin)).replace(fixed_input_size=None)
        else:
            spec = TEACHERS[name]
        teacher = build_teacher(spec, **overrides)
        size = spec.fixed_input_size or 224
        images = jax.ShapeDtypeStruct((1, size, size, spec.vit.in_chans), jnp.float32)
        shapes = nn.meta.unbox(jax.eval_shape(teacher.module.init, jax.random.key(0), images))["params"]
        teachers[name] = teacher
        params[name] = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(param_dtype)), shapes)
    return teachers, params


def batch_shapes(c: TrainConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The per-step global batch as the data pipeline delivers it (sample-major)."""
    mc, b, p = c.data.multicrop, c.data.global_batch_size, c.model.vit.patch_size
    g, loc = mc.global_size, mc.local_size
    crops = jnp.dtype(c.data.crop_dtype)  # uint8 by default: normalised inside the step (gpfm_jax.data.normalize)
    return {
        "global_crops": jax.ShapeDtypeStruct((b, 2, g, g, 3), crops),
        "local_crops": jax.ShapeDtypeStruct((b, mc.num_local_crops, loc, loc, 3), crops),
        "masks": jax.ShapeDtypeStruct((b, 2, (g // p) ** 2), jnp.bool_),
    }


def _nbytes(tree: Any) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def build(cfg: TrainConfig, target: Target, per_device_batch: int | None = None,
          remat: str | None = None, standin_teachers: bool = False, devices: list | None = None) -> Built:
    """The sharded step for the target (as gpfm-train's `train()` assembles it) and its abstract arguments."""
    cfg = resolve_config(cfg, target, per_device_batch, remat, standin_teachers)
    _validate(cfg, target)
    devices = targets_lib.devices(target) if devices is None else devices
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=devices)
    experts, expert_params = abstract_experts(cfg, target)
    model = GPFMModel(config_lib.vit_config(cfg, backend=target.backend), cfg.model.heads, experts)
    global_batch = cfg.data.global_batch_size
    schedules = make_schedules(cfg.schedule, global_batch)
    abstract_params = jax.eval_shape(model.init_student, jax.random.key(0))
    tx = make_optimizer(abstract_params, schedules, cfg.optim)
    step_cfg = config_lib.step_config(cfg, num_devices=target.chips, process_count=target.hosts)
    abstract_state = jax.eval_shape(lambda k: init_state(model, tx, k), jax.random.key(cfg.seed))
    step = jit_train_step(make_train_step(model, schedules, tx, step_cfg), mesh, abstract_state, expert_params)
    param_bytes = {"student": _nbytes(abstract_state.params), "ema_teacher": _nbytes(abstract_state.teacher),
                   "experts": _nbytes(expert_params)}
    return Built(cfg, target, model, tx, step, (abstract_state, batch_shapes(cfg), expert_params),
                 global_batch // target.chips, dict(mesh.shape), param_bytes)


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
        return {"global_crops": crops(kg, batch_abs["global_crops"]),
                "local_crops": crops(kl, batch_abs["local_crops"]),
                "masks": jax.random.bernoulli(km, 1 / 3, batch_abs["masks"].shape)}

    batch = jax.jit(make_batch, out_shardings={k: batch_sh for k in batch_abs})(jax.random.fold_in(key, 1))
    return state, batch, experts
