"""gpfm-train configs: validation (before anything compiles) and building the run's objects from a config.

The schema is `gpfm_jax/train/config_schema.py` (dataclasses; config files start from its `base_config()`);
docs/training.md lists every field. Everything here takes the typed `TrainConfig`: a config file's ConfigDict is
parsed once, where it enters (`gpfm-train`'s and `gpfm-plan`'s command lines), and the typed config is passed on.
`validate()` raises `ConfigError` naming the offending field (`config.data.global_batch_size`,
`config.teachers.uni`, ...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpfm_jax import storage
from gpfm_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from gpfm_jax.data.masking import MaskingConfig, mask_bins
from gpfm_jax.models import attention
from gpfm_jax.models.vit import ViTConfig
from gpfm_jax.encoders.teachers import STANDIN, load_teacher
from gpfm_jax.models.teachers import TEACHERS, Teacher, build_teacher, standin_spec
from gpfm_jax.train.config_schema import ConfigError, DataConfig, TrainConfig
from gpfm_jax.step.model import GPFMModel
from gpfm_jax.step.train_step import StepConfig

SOURCES = ("index", "folder", "tfds", "slides")
DTYPES = ("float32", "bfloat16", "float16")
SAVE_ERROR_MODES = ("stop", "retry")


def _typed(cfg: Any) -> TrainConfig:
    """The helpers below take the typed config, parsed once where the config enters (the command line,
    `loop.train`); a ConfigDict here is a caller that skipped that step."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"expected a TrainConfig (gpfm_jax.train.config_schema.parse(config_dict)), got "
                        f"{type(cfg).__name__}")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Settings the config leaves to the run (derived from several fields, the backend or the device count)


def compute_dtype(c: TrainConfig, backend: str | None = None) -> str:
    """bf16 on accelerators, f32 on CPU unless set."""
    dtype = c.compute.dtype
    if dtype == "auto":
        backend = backend or jax.default_backend()
        return "float32" if backend == "cpu" else "bfloat16"
    return dtype


def teacher_dtypes(c: TrainConfig, backend: str | None = None) -> tuple[str, str]:
    dtype = compute_dtype(c, backend) if c.compute.teacher_dtype == "auto" else c.compute.teacher_dtype
    param_dtype = dtype if c.compute.teacher_param_dtype == "auto" else c.compute.teacher_param_dtype
    return dtype, param_dtype


def teacher_overrides(c: TrainConfig, backend: str | None = None) -> dict[str, Any]:
    """The compute settings every expert teacher is built with (`models.teachers.build_teacher`): by the run
    (`load_experts`) and by the planner (`plan.compile.abstract_experts`) alike."""
    dtype, param_dtype = teacher_dtypes(c, backend)
    return dict(dtype=dtype, param_dtype=param_dtype, scan_layers=bool(c.compute.scan_layers),
                attention_impl=attention.resolve_impl(attention.AUTO, backend, dtype))


def vit_config(c: TrainConfig, backend: str | None = None) -> ViTConfig:
    """The student's ViT with the compute settings applied and "auto" attention resolved for the backend."""
    dtype = compute_dtype(c, backend)
    return c.model.vit.replace(dtype=dtype, param_dtype=c.compute.param_dtype,
                               scan_layers=bool(c.compute.scan_layers), remat_policy=c.compute.remat_policy,
                               attention_impl=attention.resolve_impl(c.model.vit.attention_impl, backend, dtype))


def masking_config(c: TrainConfig) -> MaskingConfig:
    grid = c.data.multicrop.global_size // c.model.vit.patch_size
    m = c.data.masking
    try:
        return dataclasses.replace(m, grid=(grid, grid), max_num_patches=m.max_num_patches or None)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.data.masking: {err}") from err


def num_shards(c: TrainConfig, process_count: int | None = None) -> int:
    process_count = jax.process_count() if process_count is None else process_count
    return int(c.data.shards) or process_count


def data_config(c: TrainConfig) -> DataConfig:
    """config.data as the pipeline takes it: the masking grid set from the crop and patch sizes."""
    return dataclasses.replace(c.data, masking=masking_config(c))


def total_steps(c: TrainConfig) -> int:
    return int(c.steps) or int(c.schedule.total_steps)


def step_config(c: TrainConfig, num_devices: int, process_count: int | None = None) -> StepConfig:
    """config.step with the derived fields set: batch_groups 0 = one group per device and microbatch (the
    reference's per-GPU batch is what one device holds at a time); max_masked 0 = the exact bound of one
    microbatch's masked tokens, and `shard_max_masked` the bound of one device's share of it, for the per-device
    selection of the masked tokens (`gpfm_jax.step.masked`; masks are drawn per data shard, `masked_bounds`)."""
    k = int(c.step.microbatches)
    total, per_device = masked_bounds(c, num_devices, process_count)
    # Per-device buffers only where they hold no more rows in all than the whole batch's buffer: when masks are
    # drawn per device chunk (data.shards a multiple of devices x microbatches, as the reference's per-GPU collate).
    # With masks drawn over a whole host's crops any device may get the largest masks, the per-device bounds add up
    # to several times the total (3.3x for the recipe on 8 devices, +21 GiB at 192 images/device on H100).
    tight = num_devices > 1 and per_device * num_devices <= total
    return dataclasses.replace(c.step, n_global=2, n_local=c.data.multicrop.num_local_crops,
                               max_masked=int(c.step.max_masked or total),
                               shard_max_masked=(num_devices, per_device if tight and not c.step.max_masked else 0),
                               batch_groups=int(c.step.batch_groups or num_devices * k), loss=c.loss,
                               concat_crops=bool(c.compute.concat_crops))


def masked_bounds(c: TrainConfig, num_devices: int, process_count: int | None = None) -> tuple[int, int]:
    """(the most masked patches one microbatch can hold, ... one device's chunk of it). Each data shard draws masks
    for its 2 x per-shard crops (ratio bins, then shuffled: any of its crops may carry the largest masks), so a set
    holding n of a shard's crops holds at most the n largest per-crop bounds of that shard; summed over shards,
    maximised over microbatches (devices). Microbatch m = the m-th of k chunks of every device's rows
    (`gpfm_jax.step.microbatch`); with one microbatch the first is the reference collate's upper bound summed over
    the shards."""
    shards, k, b = num_shards(c, process_count), int(c.step.microbatches), c.data.global_batch_size
    masking = masking_config(c)
    per_shard, per_device = b // shards, b // num_devices
    chunk = per_device // k
    bins = mask_bins(2 * per_shard, masking)
    caps = sorted((int(np.float32(masking.num_patches) * bins[i + 1]) for i in range(len(bins) - 1)), reverse=True)

    def bound(rows_of_shard) -> int:
        return sum(sum(caps[: 2 * rows_of_shard(s * per_shard, (s + 1) * per_shard)]) for s in range(shards))

    def overlap(lo: int, hi: int, d: int, m: int) -> int:
        return max(0, min(hi, d * per_device + (m + 1) * chunk) - max(lo, d * per_device + m * chunk))

    total = max(bound(lambda lo, hi: sum(overlap(lo, hi, d, m) for d in range(num_devices))) for m in range(k))
    device = max(bound(lambda lo, hi: overlap(lo, hi, d, m)) for m in range(k) for d in range(num_devices))
    return total, device


def mesh_devices(c: TrainConfig) -> list:
    devices = jax.devices()
    n = c.mesh.num_devices
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


def validate(cfg: TrainConfig, num_devices: int | None = None, process_count: int | None = None) -> None:
    """Every check that can be made without compiling (`check_paths` then `check_numbers`); raises ConfigError
    naming the field."""
    process_count = jax.process_count() if process_count is None else process_count
    if num_devices is None:
        num_devices = _typed(cfg).mesh.num_devices or jax.device_count()
    check_paths(cfg)
    check_numbers(cfg, num_devices, process_count)


def check_numbers(cfg: TrainConfig, num_devices: int, process_count: int) -> None:
    """The config's values against each other and against `num_devices` / `process_count`; reads no file, so the
    planner checks a config for a pod it is not on (`train/assembly.resolve` calls this)."""
    c = _typed(cfg)
    vit = vit_config(c)
    masking_config(c)
    mc = c.data.multicrop
    loss = c.loss
    d = c.data
    p = vit.patch_size

    _require(mc.global_size % p == 0, f"config.data.multicrop.global_size={mc.global_size} is not divisible by the "
             f"patch size config.model.vit.patch_size={p}")
    _require(mc.local_size % p == 0, f"config.data.multicrop.local_size={mc.local_size} is not divisible by the "
             f"patch size config.model.vit.patch_size={p}")
    for field in ("dtype", "teacher_dtype", "teacher_param_dtype"):
        value = getattr(c.compute, field)
        _require(value == "auto" or value in DTYPES, f"config.compute.{field}={value!r}: expected auto or {DTYPES}")
    _require(c.compute.param_dtype in DTYPES, f"config.compute.param_dtype={c.compute.param_dtype!r}")

    # teachers
    _require(len(c.teachers) > 0, "config.teachers: at least one expert teacher is needed")
    for name, bundle in c.teachers.items():
        _require(name in TEACHERS, f"config.teachers.{name}: unknown teacher; known: {sorted(TEACHERS)}")
        tp = TEACHERS[name].vit.patch_size
        _require(mc.global_size % tp == 0, f"config.data.multicrop.global_size={mc.global_size} is not divisible by "
                 f"teacher {name}'s patch size {tp} (the teachers see the global crops)")
        if bundle != STANDIN and TEACHERS[name].fixed_input_size:
            fixed = TEACHERS[name].fixed_input_size
            _require(mc.global_size == fixed, f"config.data.multicrop.global_size={mc.global_size}: teacher {name} "
                     f"takes {fixed}x{fixed} input only")
    for field in ("distill_cls_weights", "distill_patch_weights"):
        extra = sorted(t for t, w in dict(getattr(loss, field)).items() if w > 0 and t not in c.teachers)
        _require(not extra, f"config.loss.{field}: weights for teachers that are not configured: {extra}")
    for name in c.teachers:
        _require(name in loss.distill_cls_weights, f"config.loss.distill_cls_weights has no weight for teacher {name}")
        if TEACHERS[name].patch_output is None:
            _require(loss.distill_patch_weights.get(name, 0) == 0,
                     f"config.loss.distill_patch_weights.{name}: teacher {name} has no patch target")

    # batch, devices, hosts, shards; the pipeline's own rules (batch over shards, crop dtype, mask grid) are
    # PipelineConfig.validate's, named here as config.data.<field>
    b = d.global_batch_size
    shards = num_shards(c, process_count)
    try:
        data_config(c).validate(shards)
    except ValueError as err:
        raise ConfigError(f"config.data.{err}") from None
    _require(b % num_devices == 0, f"config.data.global_batch_size={b} is not divisible by the number of devices "
             f"({num_devices}); every device takes an equal share of the batch")
    _require(shards % process_count == 0, f"config.data.shards={d.shards} is not divisible by the number of "
             f"processes ({process_count})")
    _require(num_devices % c.mesh.fsdp == 0, f"config.mesh.fsdp={c.mesh.fsdp} does not divide the number of "
             f"devices ({num_devices})")
    if c.mesh.data != -1:
        _require(c.mesh.data * c.mesh.fsdp == num_devices, f"config.mesh.data={c.mesh.data} x "
                 f"config.mesh.fsdp={c.mesh.fsdp} != the number of devices ({num_devices})")
    k = c.step.microbatches
    _require(k >= 1, f"config.step.microbatches={k} must be >= 1 (1 = no accumulation)")
    _require(b % (num_devices * k) == 0, f"config.data.global_batch_size={b} does not split into {num_devices} devices "
             f"x config.step.microbatches={k}")
    groups = c.step.batch_groups or num_devices * k
    _require(b % groups == 0, f"config.step.batch_groups={groups} does not divide config.data.global_batch_size={b}")
    for field, value in (("batch_groups", groups), ("drop_path_groups", c.step.drop_path_groups or groups)):
        _require(k == 1 or value % (num_devices * k) == 0,
                 f"config.step.{field}={value} must be a multiple of devices x config.step.microbatches ({num_devices}"
                 f" x {k}): a group (the reference's per-GPU batch) must not straddle two microbatches")
    _require(k == 1 or loss.centering == "centering",
             f"config.loss.centering={loss.centering!r} normalises the teacher targets over the whole batch, which "
             f"config.step.microbatches={k} cannot split exactly; use centering (the GPFM recipe) or microbatches=1")

    # data source (where it is: check_paths)
    _require(d.source in SOURCES, f"config.data.source={d.source!r}: expected one of {SOURCES}")
    # uint8 crops are normalised inside the step with ImageNet's mean/std (data.normalize); other values need the
    # host to normalise
    _require(d.crop_dtype == "float32" or (tuple(mc.mean), tuple(mc.std)) == (IMAGENET_MEAN, IMAGENET_STD),
             "config.data.multicrop.mean/std differ from ImageNet's, which the step applies to uint8 crops: set "
             "config.data.crop_dtype=float32 to normalise with them on the host")
    _require(d.slide_handles >= 1, f"config.data.slide_handles={d.slide_handles} must be >= 1")
    _require(d.slide_cache_mb > 0, f"config.data.slide_cache_mb={d.slide_cache_mb} must be > 0 (the shared openslide "
             "tile cache in MiB)")
    _require(d.tile_workers >= 0, f"config.data.tile_workers={d.tile_workers} must be >= 0 (0: all cores)")

    # schedule / run length / checkpoints / logging / runtime
    schedule = c.schedule
    _require(total_steps(c) > 0, "config.steps / config.schedule.total_steps must be positive")
    _require(schedule.warmup_steps <= schedule.total_steps,
             f"config.schedule.warmup_steps={schedule.warmup_steps} exceeds total_steps={schedule.total_steps}")
    k = c.checkpoint
    _require(k.every > 0, f"config.checkpoint.every={k.every} must be positive")
    _require(k.keep > 0, f"config.checkpoint.keep={k.keep} must be positive")
    _require(k.keep_period >= 0, f"config.checkpoint.keep_period={k.keep_period} must be >= 0 (0 = none)")
    _require(k.on_save_error in SAVE_ERROR_MODES,
             f"config.checkpoint.on_save_error={k.on_save_error!r}: expected one of {SAVE_ERROR_MODES}")
    _require(c.log.every > 0, f"config.log.every={c.log.every} must be positive")
    _require(c.runtime.distributed in ("auto", "on", "off"),
             f"config.runtime.distributed={c.runtime.distributed!r}: expected auto, on or off")
    for f in dataclasses.fields(c.deadline):
        value = getattr(c.deadline, f.name)
        _require(value >= 0, f"config.deadline.{f.name}={value} must be >= 0 (0 = no deadline)")
    _require(c.deadline.poll_s > 0, f"config.deadline.poll_s={c.deadline.poll_s} must be positive")
    hb = c.runtime.heartbeat_timeout_s
    _require(not (c.deadline.peer_s and hb and c.deadline.peer_s >= hb),
             f"config.deadline.peer_s={c.deadline.peer_s:g} must be below config.runtime.heartbeat_timeout_s={hb} "
             "(JAX aborts the process at its heartbeat timeout, before the run can report which peer was lost)")


def check_paths(cfg: TrainConfig) -> None:
    """Whatever the config names on disk or in a bucket exists: teacher bundles, the data, init_from."""
    c = _typed(cfg)
    d = c.data
    for name, bundle in c.teachers.items():
        if bundle != STANDIN:
            _require(bool(bundle), f"config.teachers.{name} is empty: set it to an encoder bundle made by "
                     "tools/port_teacher.py (or 'standin' for a tiny random teacher)")
            _require(_has_bundle(f"config.teachers.{name}", bundle),
                     f"config.teachers.{name}={bundle!r}: no encoder bundle there (no encoder.json); make one with "
                     f"tools/port_teacher.py, or set it to 'standin'")
    if d.source in ("index", "folder"):
        found = bool(d.path) and (storage.is_url(d.path) or Path(d.path).exists())  # a packed index may be gs://
        _require(found, f"config.data.path={d.path!r}: no such "
                 f"{'index (folder or JSON file)' if d.source == 'index' else 'folder'}")
    elif d.source == "slides":
        _require(bool(d.path), "config.data.path: empty (a slides index, a list file, a glob or slide paths)")
        try:
            missing = [s for s in slide_paths(d.path) if not Path(s).is_file()]
        except (OSError, ValueError) as err:
            raise ConfigError(f"config.data.path: {err}") from err
        _require(not missing, f"config.data.path: slides not found: {missing[:5]}"
                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    elif d.source == "tfds":
        _require(bool(d.path), "config.data.path: the TFDS dataset name or builder dir is empty")
    if c.init_from:
        _require(_has_bundle("config.init_from", c.init_from),
                 f"config.init_from={c.init_from!r}: not an encoder bundle (no encoder.json)")


def _has_bundle(field: str, path: str) -> bool:
    """Whether an encoder bundle (its encoder.json) is at `path`, a folder or a gs:// URL; a bucket that cannot be
    reached is a ConfigError naming the field."""
    try:
        storage.check_reachable(path)
    except storage.StorageError as err:
        raise ConfigError(f"{field}={path!r}: {err}") from None
    return (storage.resolve(path) / "encoder.json").is_file()


def slide_paths(value: str) -> list[str]:
    """The slides `data.path` names: a built slides index, a list file, a glob, comma-separated paths."""
    from gpfm_jax.data.index.resolve import slide_list

    return slide_list(value)


# ---------------------------------------------------------------------------------------------------------------
# Building


def load_experts(c: TrainConfig) -> tuple[dict[str, Teacher], dict[str, Any]]:
    """{name: Teacher}, {name: params}: bundles through gpfm_jax.encoders.teachers, stand-ins built here (any input
    size)."""
    overrides = teacher_overrides(c)
    teachers, params = {}, {}
    for i, (name, bundle) in enumerate(c.teachers.items()):
        if bundle == STANDIN:
            s = c.standin
            # Stand-ins have no reference to match: drop a fixed input size so small demo crops work.
            spec = standin_spec(name, embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads,
                                pooler_dim=s.pooler_dim).replace(fixed_input_size=None)
            teacher = build_teacher(spec, **overrides)
            teachers[name], params[name] = teacher, teacher.init_params(c.seed + i)
        else:
            teachers[name], params[name] = load_teacher(name, bundle, c.seed + i, **overrides)
    return teachers, params


def make_source(c: TrainConfig, workdir: str | Path | None = None):
    from gpfm_jax.data import TfdsSource
    from gpfm_jax.data.index import resolve

    d = c.data
    if d.source == "index":
        try:  # a packed index may be a gs:// URL: a bad one is a config error naming the field, not a traceback
            return resolve.tile_source(d.path, d.root or None)
        except (ValueError, FileNotFoundError) as err:  # storage.StorageError is a ValueError
            raise ConfigError(f"config.data.path={d.path!r}: {err}") from None
    if d.source == "folder":
        return resolve.folder_source(d.path)
    if d.source == "tfds":
        if Path(d.path).is_dir():
            return TfdsSource(builder_dir=d.path, split=d.split)
        return TfdsSource(d.path, split=d.split, data_dir=d.data_dir or None)
    if d.source == "slides":
        cache = d.cache_dir or (str(Path(workdir) / "slide_cache") if workdir else None)
        try:
            return resolve.slide_source(d.path, tile_size=d.tile_size, magnification=d.magnification,
                                        min_tissue=d.min_tissue, handles=d.slide_handles, cache_mb=d.slide_cache_mb,
                                        cache_dir=cache, workers=d.tile_workers)
        except ValueError as err:  # an index built with other tiling: gpfm-train's config error, not a traceback
            raise ConfigError(f"config.data.path: {err}") from None
    raise ConfigError(f"config.data.source={d.source!r}: expected one of {SOURCES}")


def build_model(c: TrainConfig) -> tuple[GPFMModel, dict[str, Any]]:
    experts, expert_params = load_experts(c)
    return GPFMModel(vit_config(c), c.model.heads, experts), expert_params
