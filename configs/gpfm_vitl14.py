"""The official GPFM ViT-L/14 recipe (docs/training.md, docs/objective.md): 1,536 images per iteration,
500k-iteration schedules, UNI + Phikon + CONCH expert teachers from encoder bundles made by tools/port_teacher.py.

    gpfm-index build --json /data/tiles/index.json --out /data/tiles/index     # once: ~190M tiles, minutes
    gpfm-train --config configs/gpfm_vitl14.py --workdir runs/gpfm \
        --config.data.path=/data/tiles/index \
        --config.teachers.uni=bundles/uni --config.teachers.phikon=bundles/phikon --config.teachers.conch=bundles/conch

Data: the GPFM JSON index {slide_dir: [tile, ...]} built into a memory-mapped index folder by gpfm-index
(data.source="index"; docs/data.md), or a TFDS dataset
(data.source="tfds", data.path=<name or builder dir>, data.data_dir=...). Compute: bf16 with fp32 master params on
GPU/TPU, fp32 on CPU (compute.dtype="auto"); scanned blocks (compile time independent of depth).

Memory and layout, chosen with gpfm-plan (docs/plan.md) for the recipe's 96 images per device:
- compute.remat_policy = "dots_saveable": matmul outputs are kept, elementwise work is recomputed in the backward
  pass (+0.5% executed matmul FLOPs on H100, where the flash-attention forward is recomputed; +0% on TPU). Peak per
  device at 96 images: H100 x8 31.9 GiB (largest batch 213), v5p x8 81.7 GiB (largest 101). Without remat the step
  needs 95.7 GiB on H100 (80 GB) and 132.7 GiB on v5p (libtpu refuses it); "full" fits in ~11-16 GiB but
  recomputes the whole forward (+19%): use it on 32 GiB / 16 GiB chips (v4, v6e, v5e), where dots_saveable needs
  57-59 GiB at 96 images (--config.compute.remat_policy=full).
- mesh.fsdp = 8: state sharded over 8 devices (an H100 node, a v5p 2x2x2 slice), data parallel across groups of
  8 (16 GPUs: data=2 x fsdp=8). Data parallelism alone peaks at 71.1 GiB per device on H100 x8 (same remat) for
  ~7 ms less communication per ~570 ms step. Needs a device count divisible by 8 (else --config.mesh.fsdp=1).
- On GPUs XLA's allocator takes 75% of the memory unless told otherwise; the plan counts 90% of HBM as usable, so
  run gpfm-train with XLA_PYTHON_CLIENT_MEM_FRACTION=0.9. GPU compiler options: gpfm_jax/step/xla_options.py.
"""

from gpfm_jax.train.config_schema import base_config


def get_config():
    c = base_config()
    c.teachers.uni = "bundles/uni"
    c.teachers.phikon = "bundles/phikon"
    c.teachers.conch = "bundles/conch"
    c.data.source = "index"
    c.data.path = "data/index"  # gpfm-index build --json data/index.json --out data/index
    c.data.worker_count = 8
    c.compute.scan_layers = True
    c.compute.remat_policy = "dots_saveable"  # gpfm-plan --search on h100-8 and v5p-8 at 96/device (docs/plan.md)
    c.mesh.fsdp = 8
    c.steps = 87_500  # the released model's iteration (schedules still span schedule.total_steps = 500k)
    return c
