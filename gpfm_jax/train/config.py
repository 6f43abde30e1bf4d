"""gpfm-train configs: validation (before anything compiles) and building the run's objects from a ConfigDict.

The config layout is `configs/common.py`'s `base_config()`; docs/training.md lists every field. `validate()` raises
`ConfigError` naming the offending field (`config.data.global_batch_size`, `config.teachers.uni`, ...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections

from gpfm_jax.data.augment import MultiCropConfig
from gpfm_jax.data.masking import MaskingConfig, max_masked_tokens
from gpfm_jax.data.pipeline import PipelineConfig
from gpfm_jax.losses import LossConfig
from gpfm_jax.models.vit import ViTConfig
from gpfm_jax.teachers import STANDIN, TEACHERS, Teacher, build_teacher, load_teacher, standin_spec
from gpfm_jax.train.model import GPFMModel, HeadConfig
from gpfm_jax.train.optim import OptimConfig
from gpfm_jax.train.schedules import ScheduleConfig
from gpfm_jax.train.step import StepConfig

SOURCES = ("index", "folder", "tfds", "slides")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _dc(cls, values: Mapping[str, Any], field: str, **extra: Any):
    """Dataclass `cls` from a ConfigDict section, naming the section on unknown keys or bad values."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config.{field}: unknown fields {unknown}")
    for k, v in values.items():
        if isinstance(v, (list, ml_collections.ConfigDict)) or hasattr(v, "items"):
            values[k] = dict(v) if hasattr(v, "items") else tuple(v)
    try:
        return cls(**values, **extra)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.{field}: {err}") from err


# ---------------------------------------------------------------------------------------------------------------
# Resolved settings


def compute_dtype(cfg: ml_collections.ConfigDict, backend: str | None = None) -> str:
    """bf16 on accelerators, f32 on CPU unless set."""
    dtype = cfg.compute.dtype
    if dtype == "auto":
        backend = backend or jax.default_backend()
        return "float32" if backend == "cpu" else "bfloat16"
    return dtype


def teacher_dtypes(cfg: ml_collections.ConfigDict) -> tuple[str, str]:
    dtype = compute_dtype(cfg) if cfg.compute.teacher_dtype == "auto" else cfg.compute.teacher_dtype
    param_dtype = dtype if cfg.compute.teacher_param_dtype == "auto" else cfg.compute.teacher_param_dtype
    return dtype, param_dtype


def vit_config(cfg: ml_collections.ConfigDict) -> ViTConfig:
    c = cfg.compute
    return _dc(ViTConfig, cfg.model.vit, "model.vit", dtype=compute_dtype(cfg), param_dtype=c.param_dtype,
               scan_layers=bool(c.scan_layers), remat_policy=c.remat_policy)


def head_config(cfg: ml_collections.ConfigDict) -> HeadConfig:
    return _dc(HeadConfig, cfg.model.heads, "model.heads")


def multicrop_config(cfg: ml_collections.ConfigDict) -> MultiCropConfig:
    return _dc(MultiCropConfig, cfg.data.multicrop, "data.multicrop")


def masking_config(cfg: ml_collections.ConfigDict) -> MaskingConfig:
    grid = cfg.data.multicrop.global_size // cfg.model.vit.patch_size
    values = dict(cfg.data.masking)
    values["max_num_patches"] = values.get("max_num_patches") or None
    return _dc(MaskingConfig, values, "data.masking", grid=(grid, grid))


def loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    return _dc(LossConfig, cfg.loss, "loss")


def schedule_config(cfg: ml_collections.ConfigDict) -> ScheduleConfig:
    return _dc(ScheduleConfig, cfg.schedule, "schedule")


def optim_config(cfg: ml_collections.ConfigDict) -> OptimConfig:
    return _dc(OptimConfig, cfg.optim, "optim")


def num_shards(cfg: ml_collections.ConfigDict, process_count: int | None = None) -> int:
    process_count = jax.process_count() if process_count is None else process_count
    return int(cfg.data.shards) or process_count


def pipeline_config(cfg: ml_collections.ConfigDict) -> PipelineConfig:
    d = cfg.data
    return PipelineConfig(
        global_batch_size=d.global_batch_size, seed=cfg.seed, shuffle=d.shuffle, num_epochs=None,
        patch_size=cfg.model.vit.patch_size, worker_count=d.worker_count, worker_buffer_size=d.worker_buffer_size,
        read_threads=d.read_threads, prefetch_records=d.prefetch_records, max_read_retries=d.max_read_retries,
        multicrop=multicrop_config(cfg), masking=masking_config(cfg))


def total_steps(cfg: ml_collections.ConfigDict) -> int:
    return int(cfg.steps) or int(cfg.schedule.total_steps)


def step_config(cfg: ml_collections.ConfigDict, num_devices: int, process_count: int | None = None) -> StepConfig:
    """max_masked: the exact bound summed over the data shards (masks are drawn per shard batch)."""
    shards = num_shards(cfg, process_count)
    per_shard = cfg.data.global_batch_size // shards
    max_masked = cfg.step.max_masked or shards * max_masked_tokens(2 * per_shard, masking_config(cfg))
    return StepConfig(n_global=2, n_local=cfg.data.multicrop.num_local_crops, max_masked=int(max_masked),
                      koleo_groups=int(cfg.step.koleo_groups or num_devices), loss=loss_config(cfg))


def mesh_devices(cfg: ml_collections.ConfigDict) -> list:
    devices = jax.devices()
    n = cfg.mesh.num_devices
    if n:
        if jax.process_count() > 1:
            raise ConfigError("config.mesh.num_devices: only for single-process runs (0 = all devices)")
        if n > len(devices):
            raise ConfigError(f"config.mesh.num_devices={n}: only {len(devices)} devices")
        devices = devices[:n]
    return devices


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int | None = None) -> None:
    """Every check that can be made without compiling; raises ConfigError naming the field."""
    process_count = jax.process_count() if process_count is None else process_count
    if num_devices is None:
        num_devices = cfg.mesh.num_devices or jax.device_count()
    vit = vit_config(cfg)
    head_config(cfg)
    schedule = schedule_config(cfg)
    optim_config(cfg)
    loss = loss_config(cfg)
    mc = multicrop_config(cfg)
    d = cfg.data
    p = vit.patch_size

    _require(vit.img_size % p == 0,
             f"config.model.vit.img_size={vit.img_size} is not divisible by config.model.vit.patch_size={p}")
    _require(mc.global_size % p == 0, f"config.data.multicrop.global_size={mc.global_size} is not divisible by the "
             f"patch size config.model.vit.patch_size={p}")
    _require(mc.local_size % p == 0, f"config.data.multicrop.local_size={mc.local_size} is not divisible by the "
             f"patch size config.model.vit.patch_size={p}")
    _require(vit.embed_dim % vit.num_heads == 0,
             f"config.model.vit.embed_dim={vit.embed_dim} is not divisible by num_heads={vit.num_heads}")
    for field in ("dtype", "teacher_dtype", "teacher_param_dtype"):
        value = cfg.compute[field]
        _require(value == "auto" or value in DTYPES, f"config.compute.{field}={value!r}: expected auto or {DTYPES}")
    _require(cfg.compute.param_dtype in DTYPES, f"config.compute.param_dtype={cfg.compute.param_dtype!r}")

    # teachers
    _require(len(cfg.teachers) > 0, "config.teachers: at least one expert teacher is needed")
    for name, bundle in cfg.teachers.items():
        _require(name in TEACHERS, f"config.teachers.{name}: unknown teacher; known: {sorted(TEACHERS)}")
        if bundle != STANDIN:
            _require(bool(bundle), f"config.teachers.{name} is empty: set it to an encoder bundle made by "
                     "tools/port_teacher.py (or 'standin' for a tiny random teacher)")
            _require((Path(bundle) / "encoder.json").is_file(),
                     f"config.teachers.{name}={bundle!r}: no encoder bundle there (no encoder.json); make one with "
                     f"tools/port_teacher.py, or set it to 'standin'")
        tp = TEACHERS[name].vit.patch_size
        _require(mc.global_size % tp == 0, f"config.data.multicrop.global_size={mc.global_size} is not divisible by "
                 f"teacher {name}'s patch size {tp} (the teachers see the global crops)")
        if bundle != STANDIN and TEACHERS[name].fixed_input_size:
            fixed = TEACHERS[name].fixed_input_size
            _require(mc.global_size == fixed, f"config.data.multicrop.global_size={mc.global_size}: teacher {name} "
                     f"takes {fixed}x{fixed} input only")
    for field in ("distill_cls_weights", "distill_patch_weights"):
        extra = sorted(t for t, w in dict(getattr(loss, field)).items() if w > 0 and t not in cfg.teachers)
        _require(not extra, f"config.loss.{field}: weights for teachers that are not configured: {extra}")
    for name in cfg.teachers:
        _require(name in loss.distill_cls_weights, f"config.loss.distill_cls_weights has no weight for teacher {name}")
        if TEACHERS[name].patch_output is None:
            _require(loss.distill_patch_weights.get(name, 0) == 0,
                     f"config.loss.distill_patch_weights.{name}: teacher {name} has no patch target")

    # batch, devices, hosts, shards
    b = d.global_batch_size
    _require(b > 0, f"config.data.global_batch_size={b} must be positive")
    _require(b % num_devices == 0, f"config.data.global_batch_size={b} is not divisible by the number of devices "
             f"({num_devices}); every device takes an equal share of the batch")
    shards = num_shards(cfg, process_count)
    _require(shards % process_count == 0, f"config.data.shards={d.shards} is not divisible by the number of "
             f"processes ({process_count})")
    _require(b % shards == 0, f"config.data.global_batch_size={b} is not divisible by the data shards ({shards})")
    _require(num_devices % cfg.mesh.fsdp == 0, f"config.mesh.fsdp={cfg.mesh.fsdp} does not divide the number of "
             f"devices ({num_devices})")
    if cfg.mesh.data != -1:
        _require(cfg.mesh.data * cfg.mesh.fsdp == num_devices, f"config.mesh.data={cfg.mesh.data} x "
                 f"config.mesh.fsdp={cfg.mesh.fsdp} != the number of devices ({num_devices})")
    groups = cfg.step.koleo_groups or num_devices
    _require(b % groups == 0, f"config.step.koleo_groups={groups} does not divide config.data.global_batch_size={b}")

    # data source
    _require(d.source in SOURCES, f"config.data.source={d.source!r}: expected one of {SOURCES}")
    if d.source in ("index", "folder"):
        _require(bool(d.path) and Path(d.path).exists(), f"config.data.path={d.path!r}: no such "
                 f"{'index file' if d.source == 'index' else 'folder'}")
    elif d.source == "slides":
        missing = [s for s in _slide_paths(d.path) if not Path(s).is_file()]
        _require(bool(d.path) and not missing, f"config.data.path: slides not found: {missing or d.path!r}")
    elif d.source == "tfds":
        _require(bool(d.path), "config.data.path: the TFDS dataset name or builder dir is empty")

    # schedule / run length / checkpoints
    _require(total_steps(cfg) > 0, "config.steps / config.schedule.total_steps must be positive")
    _require(schedule.warmup_steps <= schedule.total_steps,
             f"config.schedule.warmup_steps={schedule.warmup_steps} exceeds total_steps={schedule.total_steps}")
    _require(cfg.checkpoint.every > 0, f"config.checkpoint.every={cfg.checkpoint.every} must be positive")
    _require(cfg.checkpoint.keep > 0, f"config.checkpoint.keep={cfg.checkpoint.keep} must be positive")
    _require(cfg.log.every > 0, f"config.log.every={cfg.log.every} must be positive")
    if cfg.init_from:
        _require((Path(cfg.init_from) / "encoder.json").is_file(),
                 f"config.init_from={cfg.init_from!r}: not an encoder bundle (no encoder.json)")


def _slide_paths(value: str) -> list[str]:
    return [s.strip() for s in str(value).split(",") if s.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Building


def load_experts(cfg: ml_collections.ConfigDict) -> tuple[dict[str, Teacher], dict[str, Any]]:
    """{name: Teacher}, {name: params}: bundles through gpfm_jax.teachers, stand-ins built here (any input size)."""
    dtype, param_dtype = teacher_dtypes(cfg)
    overrides = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=bool(cfg.compute.scan_layers))
    teachers, params = {}, {}
    for i, (name, bundle) in enumerate(cfg.teachers.items()):
        if bundle == STANDIN:
            # Stand-ins have no reference to match: drop a fixed input size so small demo crops work.
            spec = standin_spec(name, **dict(cfg.standin)).replace(fixed_input_size=None)
            teacher = build_teacher(spec, **overrides)
            teachers[name], params[name] = teacher, teacher.init_params(cfg.seed + i)
        else:
            teachers[name], params[name] = load_teacher(name, bundle, cfg.seed + i, **overrides)
    return teachers, params


def make_source(cfg: ml_collections.ConfigDict, workdir: str | Path | None = None):
    from gpfm_jax.data import FolderSource, IndexSource, SlideTileSource, TfdsSource

    d = cfg.data
    if d.source == "index":
        return IndexSource(d.path, root=d.root or None)
    if d.source == "folder":
        return FolderSource(d.path)
    if d.source == "tfds":
        if Path(d.path).is_dir():
            return TfdsSource(builder_dir=d.path, split=d.split)
        return TfdsSource(d.path, split=d.split, data_dir=d.data_dir or None)
    if d.source == "slides":
        cache = d.cache_dir or (str(Path(workdir) / "slide_cache") if workdir else None)
        return SlideTileSource(_slide_paths(d.path), d.tile_size, d.magnification, cache_dir=cache,
                               min_tissue=d.min_tissue)
    raise ConfigError(f"config.data.source={d.source!r}: expected one of {SOURCES}")


def build_model(cfg: ml_collections.ConfigDict) -> tuple[GPFMModel, dict[str, Any]]:
    experts, expert_params = load_experts(cfg)
    return GPFMModel(vit_config(cfg), head_config(cfg), experts), expert_params
