"""The official GPFM ViT-L/14 recipe (../shared/SPEC.md): 1,536 images per iteration, 500k-iteration schedules,
UNI + Phikon + CONCH expert teachers from encoder bundles made by tools/port_teacher.py.

    gpfm-train --config configs/gpfm_vitl14.py --workdir runs/gpfm \
        --config.data.path=/data/tiles/index.json \
        --config.teachers.uni=bundles/uni --config.teachers.phikon=bundles/phikon --config.teachers.conch=bundles/conch

Data: the GPFM JSON index {slide_dir: [tile, ...]} (data.source="index"), or a TFDS dataset
(data.source="tfds", data.path=<name or builder dir>, data.data_dir=...). Compute: bf16 with fp32 master params on
GPU/TPU, fp32 on CPU (compute.dtype="auto"); scanned blocks (compile time independent of depth).
"""

from gpfm_jax.train.config_schema import base_config


def get_config():
    c = base_config()
    c.teachers.uni = "bundles/uni"
    c.teachers.phikon = "bundles/phikon"
    c.teachers.conch = "bundles/conch"
    c.data.source = "index"
    c.data.path = "data/index.json"
    c.data.worker_count = 8
    c.compute.scan_layers = True
    c.steps = 87_500  # the released model's iteration (schedules still span schedule.total_steps = 500k)
    return c
