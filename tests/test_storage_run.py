"""gpfm-train with its workdir in a bucket (the GCS emulator of tests/emulators.py): checkpoints, config and logs
land there; two processes with no shared folder checkpoint there and resume bitwise after a SIGKILL; a save cut
short by the store going away is reported on one line and never restored; s3:// checkpoints and missing buckets are
refused on one line before anything compiles; the checkpoint's consumers (PyTorch export, init_from, encoder
loading) read it from the bucket."""

from __future__ import annotations

import re
import signal
import time

import jax
import numpy as np
import pytest

from conftest import require
from helpers_train import finish, run_cli, saved_state as _raw_state, start_two_processes
from helpers_train import assert_trees_equal as _assert_trees_equal
from gpfm_jax import storage
from gpfm_jax.train.faults import COMMIT_MARKER, EXIT_CONFIG, EXIT_SAVE_FAILED, EXIT_STALLED, committed_steps
from gpfm_jax.train.metrics_writer import read_metrics

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it


@pytest.fixture(scope="module")
def xla_cache(cache_dir):
    """The session's compilation cache: the tiny config's programs are test_train_run's and test_faults'."""
    return cache_dir


def _cli(workdir, *overrides, cache, scratch=None, **kw):
    extra = ["--scratch", str(scratch)] if scratch else []
    return run_cli(workdir, f"--config.runtime.compile_cache_dir={cache}", *extra, *overrides, **kw)


def _ok(result):
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def bucket_run(gcs, xla_cache, tmp_path_factory):
    """The tiny config to 4 iterations with --workdir gs://runs/one (checkpoints every 2)."""
    url = gcs.bucket("runs") + "/one"
    out = _ok(_cli(url, "--config.steps=4", cache=xla_cache, scratch=tmp_path_factory.mktemp("scratch_one")))
    return url, out


def test_a_run_in_a_bucket_keeps_checkpoints_config_and_logs_there(gcs, bucket_run, xla_cache, tmp_path):
    url, out = bucket_run
    assert f"checkpoints and config in {url}" in out and "done: iterations 0 -> 4" in out
    assert committed_steps(f"{url}/checkpoints") == [2, 4]
    for name in ("config.json", "config_resolved.json", "metrics.jsonl", "checkpoints/encoder.json"):
        assert storage.resolve(f"{url}/{name}").exists(), name
    assert sorted(read_metrics(url)) == [0, 1, 2, 3]
    assert list(storage.resolve(f"{url}/tensorboard").iterdir())
    # A rerun elsewhere (a fresh scratch folder) to 6 iterations: restores step 4 from the bucket and the one log
    # goes on (fetched from the bucket first).
    out = _ok(_cli(url, "--config.steps=6", cache=xla_cache, scratch=tmp_path / "elsewhere"))
    assert f"restored step 4 from {url}/checkpoints" in out
    assert sorted(read_metrics(url)) == list(range(6))
    assert committed_steps(f"{url}/checkpoints") == [2, 4, 6]


def test_an_unfinished_step_in_the_bucket_is_never_restored(gcs, bucket_run, xla_cache, tmp_path):
    """A numbered step folder without orbax's commit marker (a save cut short on gs://) is not a checkpoint: not
    counted, not restored; the run resumes from the last committed step."""
    url, _ = bucket_run
    copy = gcs.bucket("runs") + "/unfinished"
    storage.copy_tree(url, copy)
    *_, previous, last = committed_steps(f"{url}/checkpoints")  # [2, 4] (or [2, 4, 6] after the test above)
    unfinished = storage.resolve(f"{copy}/checkpoints/{last}")
    (unfinished / COMMIT_MARKER).unlink()
    assert unfinished.is_dir() and committed_steps(f"{copy}/checkpoints")[-1] == previous
    out = _ok(_cli(copy, f"--config.steps={last}", cache=xla_cache, scratch=tmp_path / "s"))
    assert f"restored step {previous} from {copy}/checkpoints" in out
    assert committed_steps(f"{copy}/checkpoints")[-2:] == [previous, last]
    _assert_trees_equal(_raw_state(f"{copy}/checkpoints", last), _raw_state(f"{url}/checkpoints", last))


def test_bad_bucket_urls_are_one_line_before_anything_compiles(gcs, xla_cache, tmp_path):
    missing = _cli("gs://no-such-bucket/run", cache=xla_cache, scratch=tmp_path / "a", timeout=120)
    assert missing.returncode == EXIT_CONFIG, missing.stdout[-3000:]
    assert re.search(r"^gpfm-train: config error: gs://no-such-bucket/run/checkpoints: bucket 'no-such-bucket' "
                     r"does not exist", missing.stdout, re.M), missing.stdout[-3000:]
    assert "Traceback" not in missing.stdout and "initialised" not in missing.stdout


def test_s3_checkpoints_are_refused_on_one_line_and_nothing_is_written(s3, xla_cache, tmp_path):
    bucket = s3.bucket("s3runs")
    result = _cli(f"{bucket}/run", cache=xla_cache, scratch=tmp_path / "a", timeout=120)
    assert result.returncode == EXIT_CONFIG, result.stdout[-3000:]
    assert "checkpoints on s3:// are not supported: orbax-checkpoint refuses s3://" in result.stdout
    assert "Traceback" not in result.stdout
    import s3fs

    assert s3fs.S3FileSystem(skip_instance_cache=True).find("s3runs") == []  # no half-written folder


def _two_processes(url: str, steps: int, cache, scratch_root, sleep: float = 0.0):
    """Two processes (helpers_train.start_two_processes), each with its own local scratch folder (GPFM_SCRATCH) and
    no other folder in common: the checkpoints are in the bucket."""
    return start_two_processes(url, str(steps), cache, "checkpoint.every=1", f"runtime.step_sleep_s={sleep}",
                               "deadline.peer_s=10", envs=[{"GPFM_SCRATCH": str(scratch_root / f"host{i}")}
                                                           for i in (0, 1)])


def test_two_hosts_without_a_shared_disk_resume_bitwise_after_a_sigkill(gcs, xla_cache, tmp_path, pair_reference):
    """Two processes, each with only its own scratch folder, checkpoints in the bucket: a run whose process 1 is
    SIGKILLed once step 2 is committed, then both restarted: the resumed run's step 4 equals bitwise the step 4 of
    the uninterrupted two-process run (conftest.py: `pair_reference`; where a checkpoint is kept does not change a
    bit of the training)."""
    bucket = gcs.bucket("pods")
    url = f"{bucket}/killed"
    procs = _two_processes(url, 4, xla_cache, tmp_path / "run", sleep=1.0)
    marker = gcs.path(f"{url}/checkpoints/2/{COMMIT_MARKER}")
    deadline = time.time() + 300
    while not marker.exists():
        assert all(p.poll() is None for p in procs), finish(procs, 5)
        assert time.time() < deadline, "step 2 never committed"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    outs = finish(procs, 120)
    assert procs[1].returncode == -signal.SIGKILL and procs[0].returncode != 0, outs[0][-3000:]
    assert 4 not in committed_steps(f"{url}/checkpoints")

    procs = _two_processes(url, 4, xla_cache, tmp_path / "rerun")
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert re.search(r"restored step [23] from", outs[0]), outs[0][-3000:]
    data = sorted(p.name for p in storage.resolve(f"{url}/checkpoints/4/data").iterdir() if p.suffix == ".json")
    assert data == ["shard_0-of-2.json", "shard_1-of-2.json"]  # each host wrote its own data position there
    _assert_trees_equal(_raw_state(f"{url}/checkpoints", 4), _raw_state(pair_reference.workdir / "checkpoints", 4))


def test_the_store_going_away_mid_save_is_one_line_and_the_rerun_resumes(gcs, xla_cache, tmp_path, alone):
    """The emulator is stopped while step 4 is being written (its first object is in the bucket, the commit marker
    is not): gpfm-train says on one line which step and URL failed, exits non-zero, step 2 stays committed, and
    after the store is back the rerun resumes from step 2 and never restores the unfinished step 4. The run that
    loses its store runs alone (conftest.py: `alone`): its report races the checkpoint deadline."""
    url = gcs.bucket("flaky") + "/run"
    with alone():
        proc = _cli(url, "--config.steps=6", "--config.runtime.step_sleep_s=0.5", "--config.deadline.checkpoint_s=10",
                    "--config.deadline.grace_s=10",
                    cache=xla_cache, scratch=tmp_path / "s", wait=False)
        step4 = gcs.path(f"{url}/checkpoints/4")
        deadline = time.time() + 300
        try:
            while not step4.exists():
                assert proc.poll() is None, proc.stdout.read()[-4000:]
                assert time.time() < deadline, "step 4 never started"
                time.sleep(0.01)
            gcs.stop()
            out = proc.communicate(timeout=240)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
            gcs.start()
    assert proc.returncode in (EXIT_SAVE_FAILED, EXIT_STALLED), out[-4000:]
    reports = [line for line in out.splitlines() if line.startswith("gpfm-train: ") and
               ("checkpoint save of step 4" in line or "stalled: " in line)]
    assert len(reports) == 1, "\n".join(line for line in out.splitlines() if line.startswith("gpfm-train"))
    assert f"{url}/checkpoints" in reports[0] and ("step 4" in reports[0] or "iteration 4" in reports[0])
    # (the storage client logs its retries with their tracebacks; the exit status shows gpfm-train did not crash)
    assert committed_steps(f"{url}/checkpoints")[:1] == [2] and 4 not in committed_steps(f"{url}/checkpoints")
    out = _ok(_cli(url, "--config.steps=6", cache=xla_cache, scratch=tmp_path / "s"))
    assert f"restored step 2 from {url}/checkpoints" in out
    assert committed_steps(f"{url}/checkpoints")[-1] == 6


def test_the_checkpoint_consumers_read_from_the_bucket(gcs, bucket_run, tmp_path):
    """PyTorch export from the bucket's checkpoint folder (and from the workdir URL itself) equals the export of a
    local copy; a bundle saved to gs:// loads back exactly (encoders.load_encoder: gpfm-extract, gpfm-bench, the
    teachers) and is accepted as config.init_from / a teacher bundle; a bundle cut short (no encoder.json) is not."""
    torch = require("torch")
    from tools.convert_to_pytorch import main as to_pytorch
    from gpfm_jax.convert.bundle import load_bundle, save_bundle
    from gpfm_jax.encoders import load_encoder
    from gpfm_jax.train import config as config_lib
    from gpfm_jax.train import encoder_meta
    from helpers_train import tiny

    url, _ = bucket_run
    local = tmp_path / "local"
    storage.copy_tree(url, local)
    outs = {}
    for name, source in (("bucket", f"{url}/checkpoints"), ("workdir", url), ("local", str(local / "checkpoints"))):
        out = tmp_path / f"{name}.pth"
        assert to_pytorch(["--checkpoint", source, "--step", "4", "--format", "timm", "--out", str(out)]) == 0
        outs[name] = torch.load(out, weights_only=True)
    for name in ("bucket", "workdir"):
        assert outs[name].keys() == outs["local"].keys()
        for key, value in outs["local"].items():
            assert torch.equal(outs[name][key], value), (name, key)

    from tools.convert_from_pytorch import main as from_pytorch

    assert from_pytorch(["--torch", str(tmp_path / "local.pth"), "--num-heads", "2",
                         "--out", gcs.bucket("bundles") + "/from_pth"]) == 0
    back, _ = load_bundle("gs://bundles/from_pth")
    assert from_pytorch(["--torch", str(tmp_path / "local.pth"), "--num-heads", "2",
                         "--out", "gs://no-such-bucket/x"]) == 1
    backbone = _raw_state(f"{url}/checkpoints", 4)["teacher"]["backbone"]
    # a timm file has no mask token (created as zeros): everything else is the checkpoint's backbone
    _assert_trees_equal({k: v for k, v in back.items() if k != "mask_token"},
                        {k: v for k, v in backbone.items() if k != "mask_token"})
    cfg = tiny(one_device=True)
    model, _ = config_lib.build_model(cfg)
    meta = {k: v for k, v in encoder_meta.encoder_meta(model.vit).items() if k not in ("format", "version")}
    bundle = gcs.bucket("bundles") + "/student"
    save_bundle(bundle, backbone, meta)
    params, _ = load_bundle(bundle)
    _assert_trees_equal(params, backbone)
    _, loaded, _ = load_encoder(bundle)
    _assert_trees_equal(loaded, backbone)
    assert config_lib._has_bundle("config.init_from", bundle)
    abstract = jax.eval_shape(model.init_student, jax.random.key(0))["backbone"]
    _assert_trees_equal(encoder_meta.load_init_backbone(bundle, model.vit, abstract), backbone)
    # gpfm-extract's and gpfm-bench's loader: a bundle URL, the run's workdir URL (its checkpoints/: EMA teacher)
    # and the local workdir copy give the same features
    from gpfm_jax.extract.encoder import load_feature_encoder

    storage.copy_tree(bundle, tmp_path / "bundle_copy")
    tiles = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    feats = {name: np.asarray(load_feature_encoder(src, batch_size=8)(tiles))
             for name, src in (("bundle", bundle), ("bundle_copy", str(tmp_path / "bundle_copy")),
                               ("workdir", url), ("local", str(local)))}
    np.testing.assert_array_equal(feats["bundle"], feats["bundle_copy"])
    np.testing.assert_array_equal(feats["workdir"], feats["local"])
    assert feats["local"].shape == (8, 32) and np.ptp(feats["local"]) > 0
    # gpfm-bench: an encoder given as `bundle = "gs://..."` resolves, hashes and loads like the local copy
    from gpfm_jax.encoder_bench.cache import Store
    from gpfm_jax.encoder_bench.features import resolve_encoder
    from gpfm_jax.encoder_bench.suite import EncoderSpec

    store = Store(tmp_path / "store")
    remote = resolve_encoder(EncoderSpec("remote", bundle=bundle, batch_size=8), store, lambda *a, **k: None)
    copy = resolve_encoder(EncoderSpec("copy", bundle=str(tmp_path / "bundle_copy"), batch_size=8), store,
                           lambda *a, **k: None)
    assert remote.key == copy.key and remote.info["bundle"] == bundle  # the same content, the same cache key
    np.testing.assert_array_equal(np.asarray(remote.load()(tiles)), feats["bundle"])
    storage.resolve(f"{bundle}/encoder.json").unlink()  # as if the upload had stopped before its last object
    assert not config_lib._has_bundle("config.init_from", bundle)
    from gpfm_jax.convert.torch_io import CheckpointError

    with pytest.raises(CheckpointError, match="not an encoder bundle"):
        load_bundle(bundle)
    with pytest.raises(Exception, match="config.teachers.uni=.*no-such-bucket.*does not exist"):
        config_lib._has_bundle("config.teachers.uni", "gs://no-such-bucket/uni")
