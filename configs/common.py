"""Shared pieces of the gpfm-train configs: every number of ../shared/SPEC.md as a ConfigDict field.

`base_config()` is the full official GPFM ViT-L/14 recipe; `configs/gpfm_vitl14.py` points it at real data and
teacher bundles, `configs/demo.py` shrinks it to run on a laptop CPU. Field meanings: docs/training.md.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from gpfm_jax.data.augment import MultiCropConfig
from gpfm_jax.losses import LossConfig
from gpfm_jax.models.vit import ViTConfig
from gpfm_jax.train.model import HeadConfig
from gpfm_jax.train.optim import OptimConfig
from gpfm_jax.train.schedules import ScheduleConfig

# ViTConfig fields that are set from config.compute, not config.model.vit
_COMPUTE = ("dtype", "param_dtype", "scan_layers", "remat_policy")


def _fields(obj, skip=()) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        if isinstance(v, dict) or hasattr(v, "items"):
            v = dict(v)
        out[f.name] = v
    return out


def vit(**changes) -> ml_collections.ConfigDict:
    """The student ViT (defaults: GPFM ViT-L/14, stochastic depth 0.4 with DINOv2's batch-subset drop)."""
    values = _fields(ViTConfig(drop_path_rate=0.4), skip=_COMPUTE)
    values.update(changes)
    return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # root key of the model init and of every per-step key (fold_in(root, step))
    c.steps = 0  # stop after this many iterations (0 = schedule.total_steps); the schedules always use total_steps
    c.init_from = ""  # an encoder bundle (e.g. converted GPFM weights): student backbone + EMA teacher backbone

    c.model = ml_collections.ConfigDict()
    c.model.vit = vit()
    c.model.heads = ml_collections.ConfigDict(_fields(HeadConfig()))

    # name -> encoder bundle folder written by tools/port_teacher.py, or "standin" (tiny random teacher)
    c.teachers = ml_collections.ConfigDict({"uni": "", "phikon": "", "conch": ""})
    c.standin = ml_collections.ConfigDict(dict(embed_dim=64, depth=2, num_heads=4, pooler_dim=32))

    loss = _fields(LossConfig())
    loss["distill_cls_weights"] = ml_collections.ConfigDict(dict(loss["distill_cls_weights"]))
    loss["distill_patch_weights"] = ml_collections.ConfigDict(dict(loss["distill_patch_weights"]))
    c.loss = ml_collections.ConfigDict(loss)
    c.schedule = ml_collections.ConfigDict(_fields(ScheduleConfig()))
    optim = _fields(OptimConfig())
    c.optim = ml_collections.ConfigDict(optim)

    c.data = ml_collections.ConfigDict()
    c.data.source = "index"  # index | folder | tfds | slides
    c.data.path = ""  # index: the JSON; folder: the root; tfds: dataset name (or builder dir); slides: comma-separated
    c.data.root = ""  # index: folder that relative slide dirs resolve against ("" = the JSON's folder)
    c.data.split = "train"  # tfds
    c.data.data_dir = ""  # tfds
    c.data.tile_size = 224  # slides: tile size read at `magnification`
    c.data.magnification = 20.0  # slides
    c.data.min_tissue = 0.5  # slides
    c.data.cache_dir = ""  # slides: tissue-grid cache ("" = <workdir>/slide_cache)
    c.data.global_batch_size = 1536  # 96 per GPU x 16 GPUs
    c.data.shards = 0  # data shards (each its own stream and masks); 0 = one per process. Fixed S: any host count divides it
    c.data.shuffle = True
    c.data.worker_count = 0  # grain worker processes per host (0 = threads in the trainer process)
    c.data.worker_buffer_size = 2
    c.data.read_threads = 2
    c.data.prefetch_records = 64
    c.data.max_read_retries = 32
    c.data.multicrop = ml_collections.ConfigDict(_fields(MultiCropConfig()))
    c.data.masking = ml_collections.ConfigDict(dict(
        mask_probability=0.5, ratio_min=0.1, ratio_max=0.5, min_num_patches=4,
        max_num_patches=0,  # 0 = half the grid (128 for 16x16); the grid itself follows global_size / patch_size
        min_aspect=0.3))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, num_devices=0))  # num_devices 0 = all (single host only)
    c.compute = ml_collections.ConfigDict(dict(
        dtype="auto",  # "auto": bfloat16 on GPU/TPU, float32 on CPU
        param_dtype="float32",  # master params
        teacher_dtype="auto",  # expert teachers' compute dtype ("auto" = dtype)
        teacher_param_dtype="auto",  # expert teachers' stored params ("auto" = teacher compute dtype; frozen)
        scan_layers=False,
        remat_policy="none"))
    c.step = ml_collections.ConfigDict(dict(
        max_masked=0,  # masked-token buffer; 0 = the exact bound from the masking config and the batch
        koleo_groups=0))  # KoLeo neighbour groups; 0 = one per device (the reference: per GPU batch)

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=2500,  # save every N iterations (and at the end and on SIGTERM/SIGINT)
        keep=3,  # keep the last K
        keep_period=12500,  # and also every checkpoint whose step is a multiple of this (0 = none)
        async_save=True))
    c.log = ml_collections.ConfigDict(dict(
        every=10,  # TensorBoard scalars every N iterations (the JSONL log gets every iteration)
        sanity_every=500,  # student/teacher agreement on the current batch (0 = off)
        progress=True,
        tensorboard=True))
    c.runtime = ml_collections.ConfigDict(dict(
        distributed="auto",  # auto: jax.distributed.initialize() when the environment names a cluster; on; off
        coordinator_address="",  # explicit multi-process setup (otherwise from SLURM / TPU / JAX_* env vars)
        num_processes=0,
        process_id=-1,
        cpu_devices=0,  # > 0: this many XLA CPU devices (testing multi-device code on one CPU)
        cpu_collectives="",  # e.g. "gloo" for multi-process CPU runs
        compile_cache_dir="",  # persistent XLA compilation cache
        step_sleep_s=0.0,  # testing aid: sleep after every iteration
        inject_nan_at_step=-1))  # testing aid: feed NaN images at this iteration (checks the non-finite stop)
    return c
