"""gpfm-train configs: the official recipe's numbers, and validation errors that name the field (before compiling)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers_train import REPO, get_config as tiny_config, run_cli
from gpfm_jax.train import config as config_lib
from gpfm_jax.train import config_schema
from gpfm_jax.train.config import ConfigError, validate


def _full():
    import configs.gpfm_vitl14 as full

    return full.get_config()


def typed(config_dict):
    return config_schema.parse(config_dict)


def test_official_recipe_numbers():
    c = typed(_full())
    vit = config_lib.vit_config(c)
    assert (vit.img_size, vit.patch_size, vit.embed_dim, vit.depth, vit.num_heads) == (224, 14, 1024, 24, 16)
    assert vit.layerscale_init == 1e-5 and vit.drop_path_rate == 0.4 and vit.drop_path_mode == "auto"
    assert vit.scan_layers and vit.dtype == "float32"  # CPU here; "auto" = bfloat16 on GPU/TPU
    assert config_lib.compute_dtype(c, backend="gpu") == "bfloat16" and c.compute.param_dtype == "float32"
    h = c.model.heads
    assert (h.out_dim, h.hidden_dim, h.bottleneck_dim, h.distill_bottleneck_dim) == (65536, 2048, 256, 256)
    s = c.schedule
    assert (s.base_lr, s.reference_batch_size, s.min_lr) == (4e-4, 1024, 1e-6)
    assert (s.total_steps, s.warmup_steps, s.freeze_last_layer_steps) == (500_000, 50_000, 1_250)
    assert (s.weight_decay, s.weight_decay_end, s.momentum_teacher, s.final_momentum_teacher) == (0.04, 0.4, 0.992, 1.0)
    assert (s.teacher_temp_start, s.teacher_temp, s.teacher_temp_warmup_steps) == (0.04, 0.07, 37_500)
    o = c.optim
    assert (o.b1, o.b2, o.layer_decay, o.patch_embed_lr_mult, o.clip_grad_norm) == (0.9, 0.999, 0.9, 0.2, 3.0)
    loss = c.loss
    assert (loss.dino_weight, loss.ibot_weight, loss.koleo_weight, loss.student_temp) == (1.0, 1.0, 0.1, 0.1)
    assert dict(loss.distill_cls_weights) == {"uni": 1.0, "phikon": 0.5, "conch": 1.0}
    assert dict(loss.distill_patch_weights) == {"uni": 0.25, "phikon": 0.125}
    mc = c.data.multicrop
    assert (mc.global_size, mc.local_size, mc.num_local_crops) == (224, 98, 8)
    assert mc.global_scale == (0.32, 1.0) and mc.local_scale == (0.05, 0.32)
    m = config_lib.masking_config(c)
    assert m.grid == (16, 16) and m.block_max == 128 and (m.ratio_min, m.ratio_max) == (0.1, 0.5)
    assert c.data.global_batch_size == 1536 and c.data.source == "index"
    step = config_lib.step_config(c, num_devices=16, process_count=2)
    assert step.batch_groups == 16 and step.n_local == 8 and step.max_masked > 0
    assert set(c.teachers) == {"uni", "phikon", "conch"}


def test_full_recipe_without_bundles_names_the_teacher_field():
    c = _full()
    c.data.source = "slides"
    c.data.path = str(REPO / "tests" / "data" / "cmu_small_region.svs")
    with pytest.raises(ConfigError, match=r"config\.teachers\.(\w+)='bundles/\1': no encoder bundle there"):
        validate(typed(c), num_devices=8, process_count=1)


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
        ({"checkpoint.on_save_error": "ignore"}, "config.checkpoint.on_save_error='ignore': expected one of"),
        ({"deadline.peer_s": 120.0}, "config.deadline.peer_s=120 must be below config.runtime.heartbeat_timeout_s=100"),
        ({"deadline.data_s": -1.0}, "config.deadline.data_s=-1.0 must be >= 0"),
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
        validate(typed(c), num_devices=8, process_count=1)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_the_tiny_and_demo_configs_validate():
    validate(typed(tiny_config()), num_devices=8, process_count=2)
    import configs.demo as demo

    validate(typed(demo.get_config()), num_devices=1, process_count=1)
    with pytest.raises(TypeError, match="expected a TrainConfig"):  # parsed once, where the config enters
        validate(tiny_config(), num_devices=8, process_count=2)


def test_cli_reports_a_bad_config_before_compiling(tmp_path):
    """Overrides on the command line reach the config; a bad one exits with status 2 and names the field."""
    result = run_cli(tmp_path / "w", "--config.data.global_batch_size=12", devices=8, timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "config.data.global_batch_size=12 is not divisible by the number of devices (8)" in result.stdout
    assert not (tmp_path / "w" / "checkpoints").exists()
    result = run_cli(tmp_path / "w", "--config.data.no_such_field=1", timeout=120)
    assert result.returncode != 0 and "no_such_field" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Every config field is read by the code it configures


class _ReadRecorder:
    """Records (dataclass, field) attribute reads made by gpfm_jax code, except the generic ones (the schema's
    conversion, validation, __post_init__ checks, dataclasses' replace/asdict/__eq__/__hash__): a field that only
    those touch configures nothing."""

    GENERIC = {"validate", "check_numbers", "check_paths", "_require", "__post_init__", "to_dict", "from_dict", "replace", "write_config",
               "__repr__", "__eq__", "__hash__"}

    def __init__(self, classes):
        import gpfm_jax

        self.package = str(Path(gpfm_jax.__file__).parent)
        self.reads: set[tuple[type, str]] = set()
        self.classes = classes

    def install(self, monkeypatch):
        import sys

        for cls in self.classes:
            names = {f.name for f in dataclasses.fields(cls)}

            def getattribute(obj, name, _cls=cls, _names=names, _get=object.__getattribute__):
                if name in _names:
                    code = sys._getframe(1).f_code
                    if (code.co_filename.startswith(self.package) and not code.co_filename.endswith("config_schema.py")
                            and code.co_name not in self.GENERIC):
                        self.reads.add((_cls, name))
                return _get(obj, name)

            monkeypatch.setattr(cls, "__getattribute__", getattribute)


def _config_classes_and_leaves():
    """Every dataclass the schema holds and every (class, field) leaf of the generated ConfigDict."""
    from gpfm_jax.train.config_schema import TrainConfig, config_fields

    classes, leaves = set(), []

    def walk(obj, path):
        classes.add(type(obj))
        for f in config_fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{path}{f.name}.")
            else:
                leaves.append((type(obj), f.name, f"config.{path}{f.name}"))

    walk(TrainConfig(), "")
    return classes, leaves


@pytest.mark.slow
def test_every_config_field_is_read_by_the_code_it_configures(tmp_path, monkeypatch):
    """A short real run (2 iterations, checkpoint, sanity metric, TensorBoard) plus the branches a run takes only
    for other settings (each data source kind, multi-process runtime, Sinkhorn centering, pathology
    augmentations): every field of the config must be read by package code somewhere. A field nothing reads (as
    checkpoint.keep was: passed on, then dropped inside a comment) fails here, named. A new field read only under
    some setting: add that setting to the branches below."""
    from gpfm_jax.data.augment import multi_crop
    from gpfm_jax.train import loop, runtime

    classes, leaves = _config_classes_and_leaves()
    recorder = _ReadRecorder(classes)
    recorder.install(monkeypatch)

    cfg = tiny_config()
    cfg.mesh.num_devices = 1
    cfg.steps = 2
    cfg.checkpoint.every = 1
    cfg.log.sanity_every = 1
    cfg.probe.enabled = True
    cfg.probe.max_tiles, cfg.probe.queries = 32, 16
    result = loop.train(config_schema.parse(cfg), tmp_path / "run")
    assert result.status == "done", result.message

    # branches of other settings
    typed = config_schema.parse(cfg)
    for source, path in (("index", tmp_path / "index.json"), ("folder", tmp_path), ("tfds", "no_such_dataset")):
        c = dataclasses.replace(typed, data=dataclasses.replace(typed.data, source=source, path=str(path)))
        with pytest.raises(Exception):
            config_lib.make_source(c)
    from gpfm_jax.data.pipeline import make_dataset
    from gpfm_jax.data.sources import FolderSource
    from gpfm_jax.data.testing import cut_tiles

    cut_tiles(tmp_path / "tiles", n=typed.data.global_batch_size, size=32)
    workers = dataclasses.replace(config_lib.data_config(typed), worker_count=1)  # grain worker settings (not started)
    make_dataset(FolderSource(tmp_path / "tiles"), workers, seed=typed.seed)
    r = dataclasses.replace(typed.runtime, distributed="on", coordinator_address="10.0.0.1:1234", num_processes=2,
                            process_id=1, cpu_devices=2, cpu_collectives="gloo", compile_cache_dir="/tmp/x")
    assert runtime.distributed_kwargs(r, {})["heartbeat_timeout_seconds"] == r.heartbeat_timeout_s
    assert ("jax_num_cpu_devices", 2) in runtime.jax_settings(r)
    sk = dataclasses.replace(typed, loss=dataclasses.replace(typed.loss, centering="sinkhorn_knopp"))
    model, expert_params = config_lib.build_model(sk)
    from gpfm_jax.step.optim import make_optimizer
    from gpfm_jax.step.schedules import make_schedules
    from gpfm_jax.step.train_step import init_state, make_train_step

    schedules = make_schedules(sk.schedule, sk.data.global_batch_size)
    tx = make_optimizer(jax.eval_shape(model.init_student, jax.random.key(0)), schedules, sk.optim)
    state = jax.eval_shape(lambda k: init_state(model, tx, k), jax.random.key(0))
    step_cfg = config_lib.step_config(sk, num_devices=1, process_count=1)
    mc = sk.data.multicrop
    g, l_, n = mc.global_size, mc.local_size, mc.num_local_crops
    batch = {"global_crops": jax.ShapeDtypeStruct((16, 2, g, g, 3), np.float32),
             "local_crops": jax.ShapeDtypeStruct((16, n, l_, l_, 3), np.float32),
             "masks": jax.ShapeDtypeStruct((16, 2, (g // 16) ** 2), bool)}
    jax.eval_shape(make_train_step(model, schedules, tx, step_cfg), state, batch, expert_params)
    patho = dataclasses.replace(mc, vflip_p=1.0, rot90=True, hed_p=1.0)
    multi_crop(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8), np.random.default_rng(1),
               patho)

    unread = [path for cls, name, path in leaves if (cls, name) not in recorder.reads]
    assert not unread, f"config fields that no code reads: {unread}"
