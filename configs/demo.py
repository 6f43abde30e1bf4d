"""The default config: a small GPFM run on a laptop CPU (2 cores, a few minutes) that shows the loss falling.

A 4-block ViT (dim 128, patch 14) student, tiny random stand-in teachers with the UNI / Phikon / CONCH interfaces,
tiles cut from the bundled sample slide tests/data/cmu_small_region.svs (CMU-1-Small-Region, CC0), 112 px global and
56 px local crops. Everything else is the official recipe, scaled: warmup, frozen last layers and teacher-temperature
warmup are shortened to the run length.

    gpfm-train --workdir runs/demo                    # = --config configs/demo.py
"""

from pathlib import Path

from gpfm_jax.train.config_schema import base_config, vit

SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs"


def get_config():
    c = base_config()
    c.steps = 0
    c.model.vit = vit(img_size=112, patch_size=14, embed_dim=128, depth=4, num_heads=4, layerscale_init=1e-5,
                      drop_path_rate=0.1)
    c.model.heads.update(dict(out_dim=1024, hidden_dim=256, bottleneck_dim=64, distill_bottleneck_dim=64))
    c.teachers.uni = "standin"
    c.teachers.phikon = "standin"
    c.teachers.conch = "standin"
    c.schedule.update(dict(base_lr=2e-2, total_steps=150, warmup_steps=15, teacher_temp_warmup_steps=30,
                           freeze_last_layer_steps=5, momentum_teacher=0.99))
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
    c.checkpoint.update(dict(every=50, keep=2, keep_period=0))
    c.log.update(dict(every=5, sanity_every=25))
    return c
