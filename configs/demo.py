"""The default config: a small GPFM run on a laptop CPU (2 cores, 2-3 minutes) in which every term learns.

A 2-block ViT (dim 64, patch 14, LayerScale 1e-5 as the recipe) student, tiny random stand-in teachers with the UNI /
Phikon / CONCH interfaces, tiles cut from the bundled sample slide tests/data/cmu_small_region.svs
(CMU-1-Small-Region, CC0), 112 px global and 56 px local crops, 16 images per iteration, 600 iterations. At the end,
a probe compares the EMA teacher with the network at its start (train/probe.py).

Everything else is the official recipe, scaled, except the teacher temperature: 0.01 throughout instead of
0.04 -> 0.07. With the recipe's temperatures the DINO term of this tiny, short run sits at ln K with a uniform
teacher (the collapse DINO's temperature study describes) — in gpfm_jax and in the official DINOv2 code alike, step
for step (docs/fidelity.md, with the curves and the runs that chose these values).

    gpfm-train --workdir runs/demo                    # = --config configs/demo.py
"""

from pathlib import Path

from gpfm_jax.train.config_schema import base_config, vit

SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs"


def get_config():
    c = base_config()
    c.steps = 0
    c.model.vit = vit(img_size=112, patch_size=14, embed_dim=64, depth=2, num_heads=4, layerscale_init=1e-5,
                      drop_path_rate=0.1)
    c.model.heads.update(dict(out_dim=256, hidden_dim=128, bottleneck_dim=32, distill_bottleneck_dim=32))
    c.teachers.uni = "standin"
    c.teachers.phikon = "standin"
    c.teachers.conch = "standin"
    c.standin.update(dict(embed_dim=32, depth=1, num_heads=2, pooler_dim=16))
    c.schedule.update(dict(base_lr=4e-3, total_steps=600, warmup_steps=60, teacher_temp_start=0.01,
                           teacher_temp=0.01, teacher_temp_warmup_steps=0, freeze_last_layer_steps=10,
                           momentum_teacher=0.99))
    c.data.source = "slides"
    c.data.path = str(SAMPLE_SLIDE)
    c.data.tile_size = 128
    c.data.magnification = 20.0
    c.data.global_batch_size = 16
    c.data.read_threads = 1
    c.data.prefetch_records = 32
    c.data.multicrop.global_size = 112
    c.data.multicrop.local_size = 56
    c.data.multicrop.num_local_crops = 4
    c.checkpoint.update(dict(every=300, keep=2, keep_period=0))
    c.log.update(dict(every=10, sanity_every=50))
    c.probe.enabled = True
    return c
