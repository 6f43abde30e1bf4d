"""gpfm-extract at scale: every local device (8 fake CPU devices), several processes (real subprocesses, with and
without jax.distributed), slides and outputs on object storage (the GCS emulator). Features must equal a one-device,
one-process run; every slide must be written exactly once; a killed process leaves no half file and its rerun does
exactly the missing slides."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import DATA_DIR
from emulators import free_port
from xla_flags import FAST_COMPILE
from gpfm_jax.extract import runner
from gpfm_jax.extract.encoder import load_feature_encoder
from gpfm_jax.extract.share import Share, balanced_split, part_path, tile_range
from test_extract import CFG, _cut_tiles, make_bundle

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

SLIDE = DATA_DIR / "cmu_small_region.svs"
REPO = Path(__file__).resolve().parents[1]
TILING = runner.SlideOptions(tile_size=256, magnification=20.0)
QUIET = runner.LoaderOptions(workers=2, progress=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("enc") / "tiny_vit")


@pytest.fixture(scope="module")
def encoder(bundle):
    return load_feature_encoder(bundle[0], batch_size=8)  # all 8 fake CPU devices of conftest


@pytest.fixture(scope="module")
def one_device(bundle):
    return load_feature_encoder(bundle[0], batch_size=8, devices=1)


def _features(path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["features"][()], f["coords"][()] if "coords" in f else f["paths"].asstr()[()]


def _close(got: np.ndarray, want: np.ndarray) -> float:
    """Largest per-row relative difference (row norms; features near zero make element ratios meaningless)."""
    return float((np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)).max())


def _slides(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True)
    for i in range(n):
        shutil.copy(SLIDE, root / f"s{i}.svs")
    return sorted(root.glob("*.svs"))


@pytest.fixture(scope="module")
def reference(one_device, tmp_path_factory):
    """One slide through one device, one process: 25 tiles (3 full batches of 8 and one padded)."""
    work = tmp_path_factory.mktemp("ref")
    report = runner.extract_slides(one_device, [SLIDE], work / "ref.h5", TILING, QUIET)
    assert [n for _, n in report.done] == [25]
    return _features(work / "ref.h5")


def test_eight_devices_equal_one_device(encoder, one_device, reference, tmp_path):
    assert encoder.num_devices == 8 and encoder.batch_size == 8 and one_device.num_devices == 1
    assert len(encoder.mesh.devices.flat) == 8
    report = runner.extract_slides(encoder, [SLIDE], tmp_path / "eight.h5", TILING, QUIET)
    feats, coords = _features(tmp_path / "eight.h5")
    np.testing.assert_array_equal(coords, reference[1])  # same tiles, same order
    assert feats.shape == reference[0].shape == (25, CFG.embed_dim) and report.num_tiles == 25
    assert _close(feats, reference[0]) <= 1e-6, _close(feats, reference[0])
    # the batch is rounded up to a multiple of the devices; a partial batch is padded and the padding dropped
    three = load_feature_encoder(one_device.source, batch_size=5, devices=3)
    assert three.batch_size == 6
    tiles = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), np.uint8)
    assert _close(three(tiles), one_device(tiles)) <= 1e-6
    with pytest.raises(ValueError, match="--devices 9: this process has 8 local device"):
        load_feature_encoder(one_device.source, devices=9)


def test_balanced_split_is_deterministic_and_balanced():
    sizes = [10, 1, 7, 3, 3, 9, 2, 5]
    parts = balanced_split(sizes, 3)
    # LPT by hand: 10->p0, 9->p1, 7->p2, 5->p2 (12), 3->p1 (12), 3->p0 (13), 2->p1 (14, tie to p1), 1->p2 (13)
    assert parts == [[0, 4], [3, 5, 6], [1, 2, 7]]
    assert [sum(sizes[i] for i in p) for p in parts] == [13, 14, 13]
    assert balanced_split([4, 4, 4, 4, 4], 2) == [[0, 2, 4], [1, 3]]  # equal sizes: alternate by position
    assert balanced_split([1], 3) == [[0], [], []]
    assert [list(tile_range(10, Share(i, 3))) for i in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="need 0 <= index < count"):
        Share(2, 2)


def test_tile_set_parts_merge_into_the_one_process_file(encoder, one_device, tmp_path):
    from gpfm_jax.extract.inputs import resolve_input

    tiles = tmp_path / "tiles"
    _cut_tiles(tiles, n=11)
    (tiles / "slide_0" / "broken.png").write_bytes(b"not a png")
    spec = resolve_input(tiles)
    whole = runner.extract_tiles(one_device, spec, tmp_path / "one.h5", QUIET)
    out = tmp_path / "out" / "tiles.h5"
    # process 1 first: process 0 then finds its part, merges both, and removes the parts
    r1 = runner.extract_tiles(encoder, spec, out, QUIET, share=Share(1, 2))
    assert part_path(out, Share(1, 2)).is_file() and not out.exists() and r1.num_tiles == 6
    r0 = runner.extract_tiles(encoder, spec, out, QUIET, share=Share(0, 2))
    assert not r0.incomplete and r0.num_tiles + r1.num_tiles == whole.num_tiles == 11
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiles.h5"]
    with h5py.File(out) as a, h5py.File(tmp_path / "one.h5") as b:
        assert a["paths"].asstr()[()].tolist() == b["paths"].asstr()[()].tolist()
        assert a["failed_paths"].asstr()[()].tolist() == b["failed_paths"].asstr()[()].tolist() == [
            str(tiles / "slide_0" / "broken.png")]
        assert _close(a["features"][()], b["features"][()]) <= 1e-6
        assert a.attrs["num_tiles"] == 11 and a.attrs["num_failed"] == 1 and "part" not in a.attrs
    # a process-0 run whose partner never comes gives up after merge_wait_s, and says so
    lonely = tmp_path / "lonely" / "tiles.h5"
    r = runner.extract_tiles(encoder, spec, lonely, runner.LoaderOptions(workers=2, progress=False, merge_wait_s=0.2),
                             share=Share(0, 2))
    assert r.incomplete and not lonely.exists() and part_path(lonely, Share(0, 2)).is_file()


def _extract_cmd(bundle_path: Path, inp, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpfm_jax.extract", "--encoder", str(bundle_path), "--input", str(inp),
            "--out", str(out), "--batch-size", "8", "--tile-size", "256", "--workers", "2", "--no-progress", *extra]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_two_processes_under_jax_distributed_write_every_slide_once(bundle, reference, tmp_path):
    slides = _slides(tmp_path / "slides", 5)
    out = tmp_path / "out"
    port = free_port()
    procs = [subprocess.Popen(_extract_cmd(bundle[0], tmp_path / "slides", out, "--distributed", "--coordinator",
                                           f"127.0.0.1:{port}", "--process-index", str(i), "--process-count", "2"),
                              cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    mine = balanced_split([SLIDE.stat().st_size] * 5, 2)
    assert mine == [[0, 2, 4], [1, 3]]
    for i, text in enumerate(logs):
        assert f"process {i} of 2" in text and f"slides: {len(mine[i])} done" in text, text
        written = sorted(line.split(": ")[0] for line in text.splitlines() if " tiles -> " in line)
        assert written == [str(slides[j]) for j in mine[i]], text  # each process wrote exactly its own slides
    assert sorted(p.name for p in out.iterdir()) == [f"s{i}.h5" for i in range(5)]
    for i in range(5):
        feats, coords = _features(out / f"s{i}.h5")
        np.testing.assert_array_equal(coords, reference[1])
        assert _close(feats, reference[0]) <= 1e-6


def test_killed_process_leaves_no_half_file_and_rerun_does_the_rest(bundle, encoder, reference, tmp_path):
    slides = _slides(tmp_path / "slides", 12)
    out = tmp_path / "out"
    mine = [slides[j] for j in balanced_split([SLIDE.stat().st_size] * 12, 2)[1]]  # s1, s3, ... (6 slides)
    proc = subprocess.Popen(_extract_cmd(bundle[0], tmp_path / "slides", out, "--process-index", "1",
                                         "--process-count", "2", "--workers", "1"),
                            cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (out.is_dir() and any(p.suffix == ".h5" for p in out.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.iterdir() if p.name.endswith(".h5") and not p.name.startswith("."))
    assert 1 <= len(finished) < len(mine), finished  # killed midway
    assert set(finished) <= {f"{s.stem}.h5" for s in mine}  # only its own slides
    for name in finished:  # whatever has a final name is whole
        feats, coords = _features(out / name)
        assert _close(feats, reference[0]) <= 1e-6 and len(coords) == 25
    report = runner.extract_slides(encoder, slides, out, TILING, QUIET, share=Share(1, 2))
    assert sorted(s.name for s in report.skipped) == [n.replace(".h5", ".svs") for n in finished]
    assert sorted(f"{s.stem}.h5" for s, _ in report.done) == sorted(
        f"{s.stem}.h5" for s in mine if f"{s.stem}.h5" not in finished)  # exactly the missing ones
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s.stem}.h5" for s in mine)  # no partial left


def test_slides_and_outputs_on_gcs(bundle, reference, gcs, tmp_path, capsys, monkeypatch):
    from gpfm_jax import storage
    from gpfm_jax.extract import cli

    bucket = gcs.bucket("extract")
    sources = {"a.h5": "a.svs", "b.h5": "sub/b.svs", "c.h5": "c.svs"}
    for name in sources.values():
        storage.upload_file(SLIDE, f"{bucket}/slides/{name}")
    storage.write_text_atomic(f"{bucket}/slides/notes.txt", "not a slide")
    cache = tmp_path / "cache"
    cache.mkdir()
    seen_in_cache: list[int] = []
    real_plan = runner.plan_slide

    def plan(path, opts):  # the cache never holds more than its bound (one slide here) while a slide is tiled
        seen_in_cache.append(sum(1 for p in cache.rglob("*.svs")))
        assert str(path).startswith(str(cache))
        return real_plan(path, opts)

    monkeypatch.setattr(runner, "plan_slide", plan)
    rc = cli.main(["--encoder", str(bundle[0]), "--input", f"{bucket}/slides/", "--out", f"{bucket}/feats",
                   "--batch-size", "8", "--tile-size", "256", "--no-progress", "--download-dir", str(cache),
                   "--slide-cache-gb", str(SLIDE.stat().st_size * 1.5 / 1e9)])
    monkeypatch.setattr(runner, "plan_slide", real_plan)
    assert rc == 0, capsys.readouterr()
    assert "3 done" in capsys.readouterr().out
    assert seen_in_cache == [1, 1, 1]  # bound of 1.5 slides: the next download waits for the last one's release
    assert not list(cache.rglob("*")) or all(p.is_dir() for p in cache.rglob("*"))  # downloads and staged files gone
    names = sorted(p.name for p in storage.resolve(f"{bucket}/feats").iterdir())
    assert names == ["a.h5", "b.h5", "c.h5"]
    for name in names:
        local = tmp_path / name
        storage.download_file(f"{bucket}/feats/{name}", local)
        feats, coords = _features(local)
        np.testing.assert_array_equal(coords, reference[1])
        assert _close(feats, reference[0]) <= 1e-6
        with h5py.File(local) as f:  # the slide's URL and name are recorded, not the cached copy's
            assert f.attrs["slide"] == f"{bucket}/slides/{sources[name]}" and f.attrs["slide_id"] == name[0]
    # a rerun finds every output in the bucket and does nothing
    rc = cli.main(["--encoder", str(bundle[0]), "--input", f"{bucket}/slides", "--out", f"{bucket}/feats",
                   "--batch-size", "8", "--tile-size", "256", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "0 done" in text and "3 already done" in text
    # a missing bucket is one clear line, before anything loads
    rc = cli.main(["--encoder", str(bundle[0]), "--input", "gs://no-such-bucket/slides", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-bucket" in err and "Traceback" not in err
