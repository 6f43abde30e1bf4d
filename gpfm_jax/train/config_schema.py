"""The gpfm-train config schema, written once: frozen dataclasses. The `ml_collections.ConfigDict` that config files
and `--config.<field>=` overrides work on is generated from them (`base_config()`), and read back into them
(`parse()`), so a field added to any of these dataclasses (or to the library configs they hold or extend: `ViTConfig`,
`HeadConfig`, `LossConfig`, `ScheduleConfig`, `OptimConfig`, `StepConfig`, `PipelineConfig`, `MultiCropConfig`,
`MaskingConfig`) appears in every config with its default and reaches the code that reads it, with nothing else to edit.

Defaults are the official GPFM ViT-L/14 recipe (docs/objective.md, docs/training.md); `configs/gpfm_vitl14.py`
points it at real data and teacher bundles, `configs/demo.py` shrinks it for a laptop CPU. Field meanings: comments
here, docs/training.md.
Fields a section's library dataclass has but the config sets elsewhere are listed in `DERIVED` (e.g. the ViT's
compute dtype comes from `compute`, the mask grid from the crop and patch sizes).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import FieldReference

from gpfm_jax.data.masking import MaskingConfig
from gpfm_jax.data.pipeline import PipelineConfig
from gpfm_jax.losses import LossConfig
from gpfm_jax.models.vit import ViTConfig
from gpfm_jax.step.model import HeadConfig
from gpfm_jax.step.optim import OptimConfig
from gpfm_jax.train.probe import ProbeConfig
from gpfm_jax.step.schedules import ScheduleConfig
from gpfm_jax.step.train_step import StepConfig


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


# Fields of library dataclasses that are not config fields: set by the run from other fields.
DERIVED: dict[type, tuple[str, ...]] = {
    ViTConfig: ("dtype", "param_dtype", "scan_layers", "remat_policy"),  # from config.compute
    MaskingConfig: ("grid",),  # data.multicrop.global_size // model.vit.patch_size
    # 2, data.multicrop.num_local_crops, config.loss, the per-device masked-token bound
    StepConfig: ("n_global", "n_local", "loss", "shard_max_masked", "concat_crops"),  # concat_crops: compute
}


def _factory(value):
    return dataclasses.field(default_factory=lambda: value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vit: ViTConfig = ViTConfig(drop_path_rate=0.4)  # GPFM ViT-L/14, stochastic depth 0.4 (DINOv2 batch-subset)
    heads: HeadConfig = HeadConfig()


@dataclasses.dataclass(frozen=True)
class StandinConfig:
    """Sizes of the tiny random stand-in teachers (teachers.<name> = "standin")."""

    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    pooler_dim: int = 32


@dataclasses.dataclass(frozen=True)
class DataConfig(PipelineConfig):
    """The pipeline's settings (`PipelineConfig`'s fields: global_batch_size, shuffle, grain workers and threads,
    crop_dtype, multicrop, masking; defined there once) and where the data lives. The run hands this object, its
    masking grid resolved, to the pipeline as it is (`train/config.data_config`)."""

    source: str = "index"  # index | folder | tfds | slides
    # index: a folder built by `gpfm-index build` (or, for small sets, the JSON itself); folder: the tile root (or its
    # built index); tfds: dataset name (or builder dir); slides: a built slides index, or a list file / glob /
    # comma-separated slide paths (then tiled once into cache_dir)
    path: str = ""
    root: str = ""  # index: folder that relative slide dirs resolve against ("" = the one recorded / the JSON's folder)
    split: str = "train"  # tfds
    data_dir: str = ""  # tfds
    tile_size: int = 224  # slides: tile size read at `magnification`
    magnification: float = 20.0  # slides
    min_tissue: float = 0.5  # slides
    cache_dir: str = ""  # slides given as a list: where their index is built ("" = <workdir>/slide_cache)
    tile_workers: int = 0  # slides given as a list: processes tiling them (0 = all cores)
    slide_handles: int = 256  # slides: open slides per process (LRU: ~25-90 KB each with the shared cache)
    slide_cache_mb: float = 64.0  # slides: openslide tile cache per process, shared by its open slides
    shards: int = 0  # data shards (each its own stream and masks); 0 = one per process. Fixed S: any host count divides it


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1 = the devices fsdp leaves
    fsdp: int = 1
    num_devices: int = 0  # 0 = all (single-process runs only)


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    dtype: str = "auto"  # "auto": bfloat16 on GPU/TPU, float32 on CPU
    param_dtype: str = "float32"  # master params
    teacher_dtype: str = "auto"  # expert teachers' compute dtype ("auto" = dtype)
    teacher_param_dtype: str = "auto"  # expert teachers' stored params ("auto" = teacher compute dtype; frozen)
    scan_layers: bool = False
    remat_policy: str = "none"  # "none", "full", "dots_and_attention_saveable" or a jax.checkpoint_policies name
    # the student's global + local crops through each block's linear layers as one matrix (models/crops.py): the
    # same step, FSDP weights gathered once per block instead of once per crop set (docs/plan.md, "Levers")
    concat_crops: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 2500  # save every N iterations (and at the end and on SIGTERM/SIGINT)
    keep: int = 3  # keep the last K
    keep_period: int = 12500  # and also every checkpoint whose step is a multiple of this (0 = none)
    async_save: bool = True
    # A save that fails (disk full, I/O error): "stop" = report it (path, free space) and stop with exit status 3, the
    # earlier checkpoints intact; "retry" = report it, keep training and save again at the next interval.
    on_save_error: str = "stop"


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10  # TensorBoard scalars every N iterations (the JSONL log gets every iteration)
    sanity_every: int = 500  # student/teacher agreement on the current batch (0 = off)
    progress: bool = True
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class SanityConfig:
    """Collapse detection (train/collapse.py): a kind of collapse that holds `collapse_window` consecutive
    iterations from `collapse_after` on is reported (log line + metrics.jsonl row of kind "collapse"); "stop" also
    saves a checkpoint and ends the run with exit status 6, "off" skips the detector."""

    on_collapse: str = "warn"  # "warn" | "stop" | "off"
    collapse_window: int = 50
    # iterations before this one never count: a fresh network is legitimately one-hot / unspread for a while (the
    # shipped demo: one-hot targets and CLS spread < 0.02 until ~iteration 110)
    collapse_after: int = 150

    def __post_init__(self):
        if self.on_collapse not in ("warn", "stop", "off"):
            raise ValueError(f"on_collapse={self.on_collapse!r}: expected 'warn', 'stop' or 'off'")
        if not isinstance(self.collapse_window, int) or self.collapse_window < 1:
            raise ValueError(f"collapse_window={self.collapse_window!r}: expected an integer >= 1")
        if not isinstance(self.collapse_after, int) or self.collapse_after < 0:
            raise ValueError(f"collapse_after={self.collapse_after!r}: expected an integer >= 0")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    distributed: str = "auto"  # auto: jax.distributed.initialize() when the environment names a cluster; on; off
    coordinator_address: str = ""  # explicit multi-process setup (otherwise from SLURM / TPU / JAX_* env vars)
    num_processes: int = 0
    process_id: int = -1
    # jax.distributed (coordination service): a process that misses heartbeats this long is declared dead and every
    # other process is stopped; waits at most initialization_timeout_s for all processes to join.
    heartbeat_timeout_s: int = 100
    initialization_timeout_s: int = 300
    shutdown_timeout_s: int = 300
    cpu_devices: int = 0  # > 0: this many XLA CPU devices (testing multi-device code on one CPU)
    cpu_collectives: str = ""  # e.g. "gloo" for multi-process CPU runs
    compile_cache_dir: str = ""  # persistent XLA compilation cache
    step_sleep_s: float = 0.0  # testing aid: sleep after every iteration
    inject_nan_at_step: int = -1  # testing aid: feed NaN images at this iteration (checks the non-finite stop)


@dataclasses.dataclass(frozen=True)
class DeadlineConfig:
    """Watchdog deadlines in seconds (0 = none). A phase that runs longer is reported (iteration, process, phase, the
    last committed checkpoint) and the run stops with exit status 4 instead of hanging; a peer process silent for
    `peer_s` is reported lost (exit status 5). Defaults are generous for pods (a first step compiles for minutes)."""

    data_s: float = 600.0  # waiting for this process's next batch
    step_s: float = 600.0  # waiting for a step's results
    first_step_s: float = 3600.0  # setup, restore and the first two iterations (compilation)
    checkpoint_s: float = 1800.0  # a checkpoint save (its blocking part), the wait for it, a restore
    peer_s: float = 30.0  # multi-process: a peer's heartbeat silent this long = lost (< runtime.heartbeat_timeout_s)
    grace_s: float = 60.0  # after a report, time to stop cleanly before the process exits anyway
    poll_s: float = 1.0  # how often the watchdog looks


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # root key of the model init and of every per-step key (fold_in(root, step))
    steps: int = 0  # stop after this many iterations (0 = schedule.total_steps); the schedules always use total_steps
    init_from: str = ""  # an encoder bundle (e.g. converted GPFM weights): student backbone + EMA teacher backbone
    model: ModelConfig = ModelConfig()
    # name -> encoder bundle folder written by tools/port_teacher.py, or "standin" (tiny random teacher)
    teachers: Mapping[str, str] = _factory({"uni": "", "phikon": "", "conch": ""})
    standin: StandinConfig = StandinConfig()
    loss: LossConfig = _factory(LossConfig())
    schedule: ScheduleConfig = ScheduleConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    compute: ComputeConfig = ComputeConfig()
    # max_masked: masked-token buffer, 0 = the exact bound from the masking config and the batch;
    # batch_groups: the reference's per-GPU batches (KoLeo neighbours, iBOT centre means), 0 = one per device
    step: StepConfig = StepConfig(batch_groups=0)
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    sanity: SanityConfig = SanityConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    deadline: DeadlineConfig = DeadlineConfig()
    # after a finished run: copy-detection probe of the EMA teacher vs the start (train/probe.py; slides only)
    probe: ProbeConfig = ProbeConfig()


# ---------------------------------------------------------------------------------------------------------------
# dataclasses -> ConfigDict


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _optional_type(cls: type, name: str) -> type | None:
    """For an `X | None` field, X (so a None default is a typed placeholder that --config.<field>= can set)."""
    hint = typing.get_type_hints(cls).get(name)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type):
            return args[0]
    return None


def config_fields(obj: Any) -> list[dataclasses.Field]:
    """The config fields of a dataclass instance (its fields minus the DERIVED ones)."""
    skip = DERIVED.get(type(obj), ())
    return [f for f in dataclasses.fields(obj) if f.name not in skip]


def to_configdict(obj: Any) -> ml_collections.ConfigDict:
    """A dataclass instance as a ConfigDict: nested dataclasses and mappings become sections, None becomes a typed
    placeholder, int defaults of float fields become floats (so an override of 1.5 is accepted)."""
    out = ml_collections.ConfigDict()
    hints = typing.get_type_hints(type(obj))
    for f in config_fields(obj):
        value = getattr(obj, f.name)
        if _is_dataclass_instance(value):
            value = to_configdict(value)
        elif isinstance(value, Mapping):
            value = ml_collections.ConfigDict(dict(value))
        elif value is None:
            kind = _optional_type(type(obj), f.name)
            value = FieldReference(None, field_type=kind) if kind else None
        elif hints.get(f.name) is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, list):
            value = tuple(value)
        out[f.name] = value
    return out


def base_config() -> ml_collections.ConfigDict:
    """The full official recipe as a ConfigDict (what config files start from)."""
    return to_configdict(TrainConfig())


def vit(**changes: Any) -> ml_collections.ConfigDict:
    """A `model.vit` section: GPFM ViT-L/14 (stochastic depth 0.4) with `changes`."""
    return to_configdict(dataclasses.replace(TrainConfig().model.vit, **changes))


# ---------------------------------------------------------------------------------------------------------------
# ConfigDict -> dataclasses


def _plain(value: Any) -> Any:
    if isinstance(value, FieldReference):
        value = value.get()
    if isinstance(value, ml_collections.ConfigDict) or isinstance(value, Mapping):
        return {k: _plain(v) for k, v in dict(value).items()}
    if isinstance(value, list):
        return tuple(value)
    return value


def _parse(default: Any, values: Mapping[str, Any], path: str) -> Any:
    values = dict(values)
    fields = {f.name: f for f in config_fields(default)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"config.{path}: unknown fields {unknown}" if path else f"config: unknown fields {unknown}")
    changes = {}
    for name, value in values.items():
        current = getattr(default, name)
        where = f"{path}.{name}" if path else name
        if _is_dataclass_instance(current):
            if not (isinstance(value, ml_collections.ConfigDict) or isinstance(value, Mapping)):
                raise ConfigError(f"config.{where}: expected a section, got {value!r}")
            changes[name] = _parse(current, value, where)
        else:
            changes[name] = _plain(value)
    try:
        return dataclasses.replace(default, **changes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.{path}: {err}" if path else f"config: {err}") from err


def parse(cfg: ml_collections.ConfigDict | TrainConfig) -> TrainConfig:
    """The typed config; raises ConfigError naming the section for unknown fields or values a dataclass refuses.
    Fields missing from a hand-written ConfigDict keep their defaults."""
    if isinstance(cfg, TrainConfig):
        return cfg
    return _parse(TrainConfig(), cfg, "")


def replace_fields(cfg: TrainConfig, changes: Mapping[str, Any]) -> TrainConfig:
    """A copy of the typed config with dotted fields replaced: `replace_fields(c, {"compute.dtype": "bfloat16"})`.
    For code that derives a config from another (gpfm-plan's target resolution) without going back to a ConfigDict."""
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        nodes = [cfg]
        for name in parents:
            nodes.append(getattr(nodes[-1], name))
        if not any(f.name == leaf for f in dataclasses.fields(nodes[-1])):
            raise ConfigError(f"config.{path}: no such field")
        new = dataclasses.replace(nodes[-1], **{leaf: value})
        for node, name in zip(reversed(nodes[:-1]), reversed(parents)):
            new = dataclasses.replace(node, **{name: new})
        cfg = new
    return cfg
