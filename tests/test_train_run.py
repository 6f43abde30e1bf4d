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
import orbax.checkpoint as ocp
import pytest

from helpers_train import REPO, get_config, run_cli
from gpfm_jax.train import checkpoint as ckpt
from gpfm_jax.train import loop, sharding
from gpfm_jax.train.metrics_writer import read_metrics


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("xla_cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # this process may have compiled before (cache initialised without a directory): start it again
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except Exception:  # noqa: BLE001 - only a speed-up
        pass
    return path


def _cli(workdir, *overrides, cache, **kw):
    return run_cli(workdir, f"--config.runtime.compile_cache_dir={cache}", *overrides, **kw)


def _ok(result):
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _raw_state(workdir: Path, step: int) -> dict:
    """The saved state tree of a step as numpy, restored without a target (as tools/convert_to_pytorch does)."""
    with ocp.CheckpointManager(Path(workdir) / "checkpoints") as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree_util.tree_map(np.asarray, restored["state"])


def _assert_trees_equal(a, b):
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------------------


def test_demo_config_runs_end_to_end_and_exports_to_pytorch(tmp_path, cache_dir):
    """configs/demo.py as shipped (reduced to 3 iterations): logs, checkpoints, TensorBoard, the resolved config,
    the sanity metric; then tools/convert_to_pytorch.py on the run's checkpoint folder."""
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
    resolved = json.loads((workdir / "config_resolved.json").read_text())
    assert resolved["compute_dtype"] == "float32" and resolved["devices"] == 1
    assert json.loads((workdir / "config.json").read_text())["data"]["source"] == "slides"
    ckpt_dir = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 3]

    # The training checkpoint exports the EMA teacher backbone to the official GPFM layout.
    torch = pytest.importorskip("torch")
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
    proc = _cli(workdir, "--config.steps=6", "--config.checkpoint.every=3", "--config.runtime.step_sleep_s=2.0",
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
    cfg = get_config()
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def _abstract_state_on(cfg, devices):
    """The run's abstract TrainState with its shardings on a mesh over `devices` (as loop.train builds it)."""
    from gpfm_jax.train import config as config_lib
    from gpfm_jax.train.optim import make_optimizer
    from gpfm_jax.train.schedules import make_schedules
    from gpfm_jax.train.step import init_state

    model, _ = config_lib.build_model(cfg)
    schedules = make_schedules(config_lib.schedule_config(cfg), cfg.data.global_batch_size)
    tx = make_optimizer(jax.eval_shape(model.init_student, jax.random.key(0)), schedules)
    abstract = jax.eval_shape(lambda k: init_state(model, tx, k), jax.random.key(0))
    mesh = sharding.make_mesh(-1, 4 if len(devices) == 8 else 1, devices=devices)
    return ckpt.with_shardings(abstract, sharding.state_shardings(abstract, mesh))


def test_restore_across_device_counts(tmp_path, cache_dir, uninterrupted):
    """8 fake devices (data 2 x fsdp 4) -> 1 device, and a 1-device checkpoint -> 8 devices: same values, new
    shardings, and training goes on from the restored step."""
    # 8 -> 1
    wd8 = tmp_path / "eight"
    result = loop.train(_tiny(**{"steps": 2, "mesh.fsdp": 4}), wd8)
    assert result.status == "done" and result.end_step == 2
    saved = _raw_state(wd8, 2)
    cfg1 = _tiny(**{"steps": 3, "mesh.num_devices": 1})
    checkpointer = ckpt.Checkpointer(wd8 / "checkpoints", every=2, keep=3)
    state, step = checkpointer.restore_latest(_abstract_state_on(cfg1, jax.devices()[:1]), None)
    checkpointer.close()
    assert step == 2
    assert state.params["backbone"]["pos_embed"].sharding.num_devices == 1
    _assert_trees_equal(ckpt.state_to_tree(state), saved)
    result = loop.train(cfg1, wd8)
    assert (result.status, result.start_step, result.end_step) == ("done", 2, 3)

    # 1 -> 8
    wd1 = tmp_path / "one"
    shutil.copytree(uninterrupted, wd1)
    cfg8 = _tiny(**{"steps": 7, "mesh.fsdp": 4})
    checkpointer = ckpt.Checkpointer(wd1 / "checkpoints", every=3, keep=3)
    state, step = checkpointer.restore_latest(_abstract_state_on(cfg8, jax.devices()), None)
    checkpointer.close()
    assert step == 6
    fc1 = state.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # (32, 128): split over fsdp on its 128 dim
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert fc1.addressable_shards[0].data.shape == (32, 32)
    _assert_trees_equal(ckpt.state_to_tree(state), _raw_state(uninterrupted, 6))
    result = loop.train(cfg8, wd1)
    assert (result.status, result.start_step, result.end_step) == ("done", 6, 7)
    assert np.isfinite(read_metrics(wd1)[6]["loss/total"])


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    workdir = tmp_path / "nan"
    result = loop.train(_tiny(**{"steps": 6, "mesh.num_devices": 1, "runtime.inject_nan_at_step": 3}), workdir)
    assert result.status == "nonfinite" and "at iteration 3" in result.message and "step 2" in result.message
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    assert not np.isfinite(read_metrics(workdir)[3]["loss/total"])
