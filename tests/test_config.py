"""gpfm-train configs: the official recipe's numbers, and validation errors that name the field (before compiling)."""

from __future__ import annotations

import re

import pytest

from helpers_train import REPO, get_config as tiny_config, run_cli
from gpfm_jax.train import config as config_lib
from gpfm_jax.train.config import ConfigError, validate


def _full():
    import configs.gpfm_vitl14 as full

    return full.get_config()


def test_official_recipe_numbers():
    c = _full()
    vit = config_lib.vit_config(c)
    assert (vit.img_size, vit.patch_size, vit.embed_dim, vit.depth, vit.num_heads) == (224, 14, 1024, 24, 16)
    assert vit.layerscale_init == 1e-5 and vit.drop_path_rate == 0.4 and vit.drop_path_mode == "auto"
    assert vit.scan_layers and vit.dtype == "float32"  # CPU here; "auto" = bfloat16 on GPU/TPU
    assert config_lib.compute_dtype(c, backend="gpu") == "bfloat16" and c.compute.param_dtype == "float32"
    h = config_lib.head_config(c)
    assert (h.out_dim, h.hidden_dim, h.bottleneck_dim, h.distill_bottleneck_dim) == (65536, 2048, 256, 256)
    s = config_lib.schedule_config(c)
    assert (s.base_lr, s.reference_batch_size, s.min_lr) == (4e-4, 1024, 1e-6)
    assert (s.total_steps, s.warmup_steps, s.freeze_last_layer_steps) == (500_000, 50_000, 1_250)
    assert (s.weight_decay, s.weight_decay_end, s.momentum_teacher, s.final_momentum_teacher) == (0.04, 0.4, 0.992, 1.0)
    assert (s.teacher_temp_start, s.teacher_temp, s.teacher_temp_warmup_steps) == (0.04, 0.07, 37_500)
    o = config_lib.optim_config(c)
    assert (o.b1, o.b2, o.layer_decay, o.patch_embed_lr_mult, o.clip_grad_norm) == (0.9, 0.999, 0.9, 0.2, 3.0)
    loss = config_lib.loss_config(c)
    assert (loss.dino_weight, loss.ibot_weight, loss.koleo_weight, loss.student_temp) == (1.0, 1.0, 0.1, 0.1)
    assert dict(loss.distill_cls_weights) == {"uni": 1.0, "phikon": 0.5, "conch": 1.0}
    assert dict(loss.distill_patch_weights) == {"uni": 0.25, "phikon": 0.125}
    mc = config_lib.multicrop_config(c)
    assert (mc.global_size, mc.local_size, mc.num_local_crops) == (224, 98, 8)
    assert mc.global_scale == (0.32, 1.0) and mc.local_scale == (0.05, 0.32)
    m = config_lib.masking_config(c)
    assert m.grid == (16, 16) and m.block_max == 128 and (m.ratio_min, m.ratio_max) == (0.1, 0.5)
    assert c.data.global_batch_size == 1536 and c.data.source == "index"
    step = config_lib.step_config(c, num_devices=16, process_count=2)
    assert step.koleo_groups == 16 and step.n_local == 8 and step.max_masked > 0
    assert set(c.teachers) == {"uni", "phikon", "conch"}


def test_full_recipe_without_bundles_names_the_teacher_field():
    c = _full()
    c.data.source = "slides"
    c.data.path = str(REPO / "tests" / "data" / "cmu_small_region.svs")
    with pytest.raises(ConfigError, match=r"config\.teachers\.(\w+)='bundles/\1': no encoder bundle there"):
        validate(c, num_devices=8, process_count=1)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"teachers.phikon": "/nonexistent/phikon"}, "config.teachers.phikon='/nonexistent/phikon': no encoder bundle"),
        ({"teachers.uni": ""}, "config.teachers.uni is empty"),
        ({"data.global_batch_size": 12}, "config.data.global_batch_size=12 is not divisible by the number of devices (8)"),
        ({"data.multicrop.global_size": 72}, "config.data.multicrop.global_size=72 is not divisible by the patch size "
                                             "config.model.vit.patch_size=16"),
        ({"data.multicrop.local_size": 40}, "config.data.multicrop.local_size=40 is not divisible by the patch size"),
        ({"model.vit.patch_size": 14}, "config.model.vit: img_size 64 is not divisible by patch_size 14"),
        ({"data.path": "/nonexistent.svs"}, "config.data.path: slides not found"),
        ({"data.source": "s3"}, "config.data.source='s3'"),
        ({"mesh.fsdp": 3}, "config.mesh.fsdp=3 does not divide the number of devices (8)"),
        ({"data.shards": 3}, "config.data.global_batch_size=16 is not divisible by the data shards (3)"),
        ({"init_from": "/nonexistent"}, "config.init_from='/nonexistent': not an encoder bundle"),
        ({"model.heads.out_dims": 3}, "config.model.heads: unknown fields ['out_dims']"),
    ],
)
def test_validation_errors_name_the_field(changes, message):
    c = tiny_config()
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[leaf] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(c, num_devices=8, process_count=1)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_the_tiny_and_demo_configs_validate():
    validate(tiny_config(), num_devices=8, process_count=2)
    import configs.demo as demo

    validate(demo.get_config(), num_devices=1, process_count=1)


def test_cli_reports_a_bad_config_before_compiling(tmp_path):
    """Overrides on the command line reach the config; a bad one exits with status 2 and names the field."""
    result = run_cli(tmp_path / "w", "--config.data.global_batch_size=12", devices=8, timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "config.data.global_batch_size=12 is not divisible by the number of devices (8)" in result.stdout
    assert not (tmp_path / "w" / "checkpoints").exists()
    result = run_cli(tmp_path / "w", "--config.data.no_such_field=1", timeout=120)
    assert result.returncode != 0 and "no_such_field" in result.stdout
