"""gpfm-train end to end: the demo config, exact resume after SIGKILL, a corrupt latest checkpoint, restoring across
device counts, and the checkpoint -> PyTorch export. Runs are real `python -m gpfm_jax.train.main` processes (or
`loop.train` in this process with its 8 fake devices); a shared persistent compilation cache keeps compiles to one
per (config, mesh)."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import require

from helpers_train import REPO, run_cli, saved_state, tiny
from helpers_train import assert_trees_equal as _assert_trees_equal
from gpfm_jax.train import checkpoint as ckpt
from gpfm_jax.train import encoder_meta, loop
from gpfm_jax.train.config_schema import CheckpointConfig, replace_fields
from gpfm_jax.train.metrics_writer import read_metrics

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it




def _cli(workdir, *overrides, cache, **kw):
    return run_cli(workdir, f"--config.runtime.compile_cache_dir={cache}", *overrides, **kw)


def _ok(result):
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _raw_state(workdir: Path, step: int) -> dict:
    """The saved state tree of a step of a run folder (helpers_train.saved_state)."""
    return saved_state(Path(workdir) / "checkpoints", step)


# ---------------------------------------------------------------------------------------------------------------


def test_demo_config_runs_end_to_end_and_exports_to_pytorch(tmp_path, cache_dir):
    """configs/demo.py as shipped (reduced to 3 iterations): logs, checkpoints, TensorBoard, the resolved config,
    the sanity metric, the end-of-run probe; then tools/convert_to_pytorch.py on the run's checkpoint folder."""
    workdir = tmp_path / "demo"
    out = _ok(_cli(workdir, "--config.steps=3", "--config.checkpoint.every=2", "--config.log.sanity_every=2",
                   cache=cache_dir, config=REPO / "configs" / "demo.py"))
    assert "done: iterations 0 -> 3" in out
    rows = read_metrics(workdir)
    assert sorted(rows) == [0, 1, 2]
    for row in rows.values():
        assert np.isfinite(row["loss/total"]) and "loss/dino" in row and "schedule/lr" in row
        assert "data/num_skipped" in row and "grad_norm/backbone" in row
    sanity = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if '"sanity"' in line]
    assert sanity and 0.0 <= sanity[-1]["sanity/argmax_agreement"] <= 1.0 and "sanity/cls_cosine" in sanity[-1]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    probe = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if '"probe"' in line]
    assert len(probe) == 1 and probe[0]["step"] == 2 and probe[0]["probe/queries"] > 100
    assert 0.0 <= probe[0]["probe/top1/init"] <= probe[0]["probe/top5/init"] <= 1.0
    assert probe[0]["probe/chance"] == pytest.approx(1.0 / probe[0]["probe/tiles"])
    assert "probe (find a tile from an augmented view" in out
    resolved = json.loads((workdir / "config_resolved.json").read_text())
    assert resolved["compute_dtype"] == "float32" and resolved["devices"] == 1
    assert json.loads((workdir / "config.json").read_text())["data"]["source"] == "slides"
    ckpt_dir = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 3]

    # The training checkpoint exports the EMA teacher backbone to the official GPFM layout.
    torch = require("torch")
    from tools.convert_to_pytorch import main as to_pytorch

    assert to_pytorch(["--checkpoint", str(ckpt_dir), "--format", "gpfm", "--out", str(tmp_path / "gpfm.pth")]) == 0
    exported = torch.load(tmp_path / "gpfm.pth", weights_only=True)["teacher"]
    teacher = _raw_state(workdir, 3)["teacher"]["backbone"]
    np.testing.assert_array_equal(exported["backbone.pos_embed"].numpy(), teacher["pos_embed"])
    np.testing.assert_array_equal(exported["backbone.cls_token"].numpy(), teacher["cls_token"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """The tiny config, 6 iterations in one go on 1 device, checkpoints every 3."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _ok(_cli(workdir, "--config.steps=6", "--config.checkpoint.every=3", cache=cache_dir))
    return workdir


def test_exact_resume_after_sigkill(tmp_path, cache_dir, uninterrupted):
    """Run 3 iterations, SIGKILL the process once checkpoint 3 is committed, resume to 6: the iterations 3..5 and
    the final state are bitwise those of the uninterrupted run."""
    workdir = tmp_path / "killed"
    proc = _cli(workdir, "--config.steps=6", "--config.checkpoint.every=3", "--config.runtime.step_sleep_s=0.7",
                cache=cache_dir, wait=False)
    committed = workdir / "checkpoints" / "3"
    deadline = time.time() + 240
    while not committed.is_dir():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline, "checkpoint 3 never appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "checkpoints" / "6").exists()
    before = read_metrics(workdir)
    assert 2 in before and 5 not in before

    out = _ok(_cli(workdir, "--config.steps=6", "--config.checkpoint.every=3", cache=cache_dir))
    assert "restored step 3" in out
    resumed, reference = read_metrics(workdir), read_metrics(uninterrupted)
    assert sorted(resumed) == sorted(reference) == list(range(6))
    for step in range(6):
        for key, value in reference[step].items():
            if key.startswith(("loss/", "grad_norm/", "schedule/", "masked")):
                assert resumed[step][key] == value, (step, key, resumed[step][key], value)  # bitwise
    _assert_trees_equal(_raw_state(workdir, 6), _raw_state(uninterrupted, 6))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, cache_dir, uninterrupted):
    workdir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, workdir)
    (workdir / "metrics.jsonl").unlink()
    files = [p for p in (workdir / "checkpoints" / "6" / "state").rglob("*") if p.is_file()]
    assert files
    for p in files:  # truncate every file of the latest step's state to half its size
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    out = _ok(_cli(workdir, "--config.steps=6", "--config.checkpoint.every=3", cache=cache_dir))
    assert "checkpoints/6 cannot be restored" in out and "6.corrupt-0" in out, out[-3000:]
    assert "restored step 3" in out
    assert (workdir / "checkpoints" / "6.corrupt-0").is_dir()
    rows, reference = read_metrics(workdir), read_metrics(uninterrupted)
    assert sorted(rows) == [3, 4, 5]
    assert [rows[s]["loss/total"] for s in rows] == [reference[s]["loss/total"] for s in (3, 4, 5)]
    _assert_trees_equal(_raw_state(workdir, 6), _raw_state(uninterrupted, 6))


def _tiny(**changes):
    return tiny(**changes)


def _assembled(cfg, devices):
    """The run's step for `cfg` on a mesh over `devices`, assembled as loop.train assembles it."""
    from gpfm_jax.train import assembly
    from gpfm_jax.train import config as config_lib

    teachers, experts = config_lib.load_experts(cfg)
    resolved = assembly.resolve(cfg, len(devices), jax.process_count(), jax.default_backend())
    return assembly.assemble(resolved, devices, teachers, experts)


def _abstract_state_on(cfg, devices):
    """The run's abstract TrainState with its shardings on a mesh over `devices`."""
    built = _assembled(cfg, devices)
    return ckpt.with_shardings(built.abstract_state, built.shardings)


@pytest.fixture(scope="module")
def reference8(tmp_path_factory, cache_dir):
    """The tiny config on this process's 8 fake devices (data 2 x fsdp 4, both data shards here), 2 iterations."""
    workdir = tmp_path_factory.mktemp("reference8")
    result = loop.train(_tiny(**{"steps": 2, "mesh.fsdp": 4}), workdir)
    assert (result.status, result.end_step) == ("done", 2)
    return workdir


def test_multihost_two_processes_match_one_process_with_8_devices(reference8, pair_reference):
    """Two processes on localhost (127.0.0.1 coordinator, gloo, 4 CPU devices each, each reading only its data
    shard; conftest.py: `pair_reference`) = one process with 8 devices: same losses and params after 2 iterations
    (rtol 1e-5), and a checkpoint saved by both (each its data position). That the two processes restore their
    checkpoints together and go on bitwise: test_faults.py (killed peer), test_storage_run.py (two hosts)."""
    workdir = pair_reference.workdir
    assert "8 devices {'data': 2, 'fsdp': 4} on 2 process(es)" in pair_reference.output  # (only process 0 prints)
    data = sorted(p.name for p in (workdir / "checkpoints" / "2" / "data").glob("*.json"))
    assert data == ["shard_0-of-2.json", "shard_1-of-2.json"]  # each process wrote its own shard's position
    rows, reference = read_metrics(workdir), read_metrics(reference8)
    assert sorted(reference) == [0, 1] and sorted(rows)[:2] == [0, 1]
    for step in range(2):
        for key, value in reference[step].items():
            if key.startswith(("loss/", "grad_norm/", "masked")):
                np.testing.assert_allclose(rows[step][key], value, rtol=1e-5, atol=1e-6, err_msg=f"{step} {key}")
    got, want = _raw_state(workdir, 2), _raw_state(reference8, 2)
    # The attention key bias has an exactly-zero gradient (softmax is shift-invariant): what it gets is rounding
    # noise, which Adam scales up to LR-sized steps, and the noise depends on the all-reduce order. Its slice is
    # compared on the LR scale; every other parameter (query/value biases included) to rtol 1e-5.
    for tree in (got, want):
        for part in ("params", "teacher"):
            qkv = tree[part]["backbone"]["blocks_0"]["attn"]["qkv"]["bias"]
            d = qkv.shape[0] // 3
            tree[part]["backbone"]["blocks_0"]["attn"]["qkv"]["key_bias"] = qkv[d : 2 * d].copy()
            qkv[d : 2 * d] = 0.0
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                 jax.tree_util.tree_flatten_with_path(want)[0]):
        tol = dict(rtol=0, atol=1e-4) if "key_bias" in jax.tree_util.keystr(path) else dict(rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **tol)


def test_restore_across_device_counts(tmp_path, cache_dir, uninterrupted, reference8):
    """A checkpoint of 8 fake devices (data 2 x fsdp 4) onto 1 device, and a 1-device checkpoint onto 8 devices:
    same values, the new shardings, and training goes on from the restored step."""
    cfg8 = _tiny(**{"mesh.fsdp": 4})
    cfg1 = _tiny(**{"mesh.num_devices": 1})

    # 8 -> 1: restore here onto one device, then a 1-device process continues the run
    checkpointer = ckpt.Checkpointer(reference8 / "checkpoints", CheckpointConfig(every=2, keep=3))
    state, step = checkpointer.restore_latest(_abstract_state_on(cfg1, jax.devices()[:1]), None)
    checkpointer.close()
    assert step == 2 and state.params["backbone"]["pos_embed"].sharding.num_devices == 1
    _assert_trees_equal(ckpt.state_to_tree(state), _raw_state(reference8, 2))
    wd8 = tmp_path / "from8"
    shutil.copytree(reference8, wd8)
    out = _ok(_cli(wd8, "--config.steps=3", cache=cache_dir, devices=1))
    assert "restored step 2" in out and "1 devices" in out
    assert np.isfinite(read_metrics(wd8)[2]["loss/total"])

    # 1 -> 8: restore onto the 2 x 4 mesh (really sharded), then train on it here
    checkpointer = ckpt.Checkpointer(uninterrupted / "checkpoints", CheckpointConfig(every=3, keep=3))
    state, step = checkpointer.restore_latest(_abstract_state_on(cfg8, jax.devices()), None)
    checkpointer.close()
    assert step == 6
    fc1 = state.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # (32, 128): split over fsdp on its 128 dim
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert fc1.addressable_shards[0].data.shape == (32, 32)
    _assert_trees_equal(ckpt.state_to_tree(state), _raw_state(uninterrupted, 6))
    wd1 = tmp_path / "from1"
    shutil.copytree(uninterrupted, wd1)
    result = loop.train(replace_fields(cfg8, {"steps": 7}), wd1)
    assert (result.status, result.start_step, result.end_step) == ("done", 6, 7)
    assert np.isfinite(read_metrics(wd1)[6]["loss/total"])


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    workdir = tmp_path / "nan"
    result = _cli(workdir, "--config.steps=6", "--config.runtime.inject_nan_at_step=3", cache=cache_dir)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "non-finite loss (nan) at iteration 3" in result.stdout and "last good checkpoint is step 2" in result.stdout
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    assert not np.isfinite(read_metrics(workdir)[3]["loss/total"])


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
    workdir = tmp_path / "preempted"
    proc = _cli(workdir, "--config.steps=40", "--config.checkpoint.every=100", "--config.runtime.step_sleep_s=0.5",
                cache=cache_dir, wait=False)
    deadline = time.time() + 240
    while len(read_metrics(workdir)) < 3:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 40, saved
    assert f"signal received: saved iteration {saved[0]}" in out
    assert sorted(read_metrics(workdir)) == list(range(saved[0]))


def test_init_from_an_encoder_bundle_sets_student_and_ema_teacher_backbones(tmp_path, uninterrupted):
    from gpfm_jax.convert.bundle import save_bundle
    from gpfm_jax.train import config as config_lib

    backbone = _raw_state(uninterrupted, 6)["teacher"]["backbone"]
    built = _assembled(_tiny(**{"mesh.num_devices": 1}), jax.devices()[:1])
    meta = encoder_meta.encoder_meta(built.model.vit)
    save_bundle(tmp_path / "bundle", backbone, {k: v for k, v in meta.items() if k not in ("format", "version")})
    state = loop.initial_state(built, jax.random.key(0), str(tmp_path / "bundle"))
    _assert_trees_equal(state.params["backbone"], backbone)
    _assert_trees_equal(state.teacher["backbone"], backbone)
    fresh = loop.initial_state(built, jax.random.key(0))
    _assert_trees_equal(state.params["dino_head"], fresh.params["dino_head"])  # heads stay as initialised
    bad = _tiny(**{"model.vit.embed_dim": 64, "mesh.num_devices": 1})
    bad_model, _ = config_lib.build_model(bad)
    bad_shapes = jax.eval_shape(bad_model.init_student, jax.random.key(0))["backbone"]
    with pytest.raises(ValueError, match="config.init_from=.*differs from config.model.vit in embed_dim"):
        encoder_meta.load_init_backbone(tmp_path / "bundle", bad_model.vit, bad_shapes)


def test_a_changed_data_shard_count_is_a_config_error_not_a_corrupt_checkpoint(tmp_path, cache_dir, uninterrupted):
    workdir = tmp_path / "reshard"
    shutil.copytree(uninterrupted, workdir)
    result = _cli(workdir, "--config.steps=7", "--config.data.shards=1", cache=cache_dir)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "saved for 2 data shards, this run has 1" in result.stdout and "--config.data.shards=2" in result.stdout
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.is_dir()) == ["3", "6"]
