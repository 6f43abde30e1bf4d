"""gpfm-index, kind "slides": the same tiles and records as SlideTileSource; unreadable and crashing slides named,
skipped and counted; a killed build resumes; the per-process slide handle LRU bounds open handles."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpfm_jax.data import slides
from gpfm_jax.data.index import SlideIndexSource, TileIndex, build_from_slides, build_slides, resolve
from gpfm_jax.data.sources import SlideTileSource
from gpfm_jax.data.testing import SLIDE

REPO = Path(__file__).resolve().parents[1]


def _copies(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"slide_{i:03d}.svs"
        if not p.exists():
            os.symlink(SLIDE, p)
        out.append(p)
    return out


def crash_on_second(path: str, params: dict) -> dict:
    """A tiler whose process dies (as in a segfault of the slide library) on one slide."""
    if path.endswith("slide_001.svs"):
        os._exit(11)
    return build_slides.tile_slide(path, params)


def test_list_build_skips_bad_slides_and_matches_slide_tile_source(tmp_path, capsys):
    good = _copies(tmp_path / "s", 3)
    (tmp_path / "s" / "broken.svs").write_bytes(b"not a slide")
    (tmp_path / "list.txt").write_text("# slides\ns/slide_000.svs\ns/broken.svs\n\ns/slide_001.svs\ns/gone.svs\n"
                                       f"{good[2]}\n")
    messages = []
    out = build_from_slides(tmp_path / "list.txt", tmp_path / "idx", workers=1, min_tissue=0.5,
                            report=messages.append)
    assert [m.split(":")[0] for m in messages[:2]] == [f"skipped slide {tmp_path / 's' / n}" for n in
                                                       ("broken.svs", "gone.svs")]
    assert messages[-1].startswith("3 slides tiled, 123 tiles, 2 slides skipped")
    assert (out / "skipped.tsv").read_text().count("\n") == 3  # header + 2
    src, ref = SlideIndexSource(out), SlideTileSource(good, 224, 20, min_tissue=0.5)
    assert len(src) == len(ref) == 3 * 41 and src.num_slides == 3
    assert [src.position(i) for i in range(len(src))] == [ref.position(i) for i in range(len(ref))]
    for i in (0, 40, 41, 122):
        a, b = src[i], ref[i]
        assert a.keys() == b.keys() and a["path"] == b["path"] and a["slide"] == b["slide"]
        assert np.array_equal(a["coords"], b["coords"]) and np.array_equal(a["image"], b["image"])
    info = TileIndex(out).manifest
    assert info["arrays"]["coords"]["bytes"] == 8 * 123 and info["num_skipped_slides"] == 2
    assert resolve.slide_list(out) == [str(p) for p in [tmp_path / "s" / "slide_000.svs",
                                                        tmp_path / "s" / "slide_001.svs", good[2]]]


def test_a_slide_that_kills_its_worker_is_skipped(tmp_path):
    paths = [str(p) for p in _copies(tmp_path / "s", 3)]
    messages = []
    out = build_from_slides(paths, tmp_path / "idx", workers=2, report=messages.append, tiler=crash_on_second)
    assert any("slide_001.svs: the slide reader crashed its process, twice" in m for m in messages)
    assert resolve.slide_list(out) == [paths[0], paths[2]]
    assert len(SlideIndexSource(out)) == 82


def test_a_killed_build_resumes(tmp_path):
    paths = _copies(tmp_path / "s", 12)
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in paths))
    cmd = [sys.executable, "-m", "gpfm_jax.data.index", "build", "--slides", str(tmp_path / "list.txt"), "--out",
           str(tmp_path / "idx"), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
    done = tmp_path / ".idx.partial" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and (not done.is_dir() or len(list(done.glob("*.npz"))) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(done.glob("*.npz")))
    assert 3 <= finished < 12 and not (tmp_path / "idx").exists()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {finished} of 12 slides already tiled" in r.stderr
    assert "12 slides tiled, 492 tiles, 0 slides skipped" in r.stderr
    assert not (tmp_path / ".idx.partial").exists()
    src = SlideIndexSource(tmp_path / "idx")
    ref = slides.tile_coordinates(SLIDE, 224, 20).coords
    assert np.array_equal(np.asarray(src.index.array("coords")), np.tile(ref, (12, 1)))
    assert [src.position(41 * k)[0] for k in range(12)] == list(range(12))


def test_handle_lru_bounds_open_slides_and_file_descriptors(tmp_path):
    paths = [str(p) for p in _copies(tmp_path / "s", 6)]
    src = SlideIndexSource(build_from_slides(paths, tmp_path / "idx", workers=1), handles=2, cache_mb=8)
    src[0]  # maps the index arrays: one descriptor each (Python's mmap keeps one), a constant per process
    fds0 = len(os.listdir("/proc/self/fd"))
    peak = 0
    for i in np.random.default_rng(0).permutation(len(src))[:60]:
        src[int(i)]
        peak = max(peak, len(os.listdir("/proc/self/fd")) - fds0)
        assert len(src.handles) <= 2
    assert src.handles.opened > 6  # slides were closed and opened again
    assert peak <= 2  # at most one per open slide (openslide 4.0.1 was measured to hold none between reads)
    # eviction never closes a handle a reader is using: it is closed when that reader is done
    lru = slides.SlideHandles(capacity=1)
    with lru.open(paths[0]) as held:
        hold_done = threading.Event()

        def other():
            with lru.open(paths[1]):
                pass
            hold_done.set()

        threading.Thread(target=other).start()
        assert hold_done.wait(10)
        assert held.read_region((0, 0), 0, (8, 8)).size == (8, 8)  # evicted, still open for us
    with pytest.raises(Exception):
        held.read_region((0, 0), 0, (8, 8))  # closed once released
    src.handles.close()


def test_slide_source_builds_a_list_once_into_the_cache(tmp_path, monkeypatch):
    paths = [str(p) for p in _copies(tmp_path / "s", 2)]
    spec = ",".join(paths)
    a = resolve.slide_source(spec, cache_dir=tmp_path / "cache", workers=1)
    assert isinstance(a, SlideIndexSource) and len(a) == 82

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(resolve, "build_from_slides", no_build)
    b = resolve.slide_source(spec, cache_dir=tmp_path / "cache", workers=1)
    assert b.origin == a.origin
    assert isinstance(resolve.slide_source(a.origin), SlideIndexSource)
    # a built index serves the tiles it was built with: another tile size or magnification in the config is refused
    with pytest.raises(ValueError, match=r"tile_size=224 \(config.data.tile_size=256\)"):
        resolve.slide_source(a.origin, tile_size=256)
    with pytest.raises(ValueError, match=r"magnification=20.0 \(config.data.magnification=40.0\)"):
        resolve.slide_source(a.origin, magnification=40)
    assert isinstance(resolve.slide_source(paths[0]), SlideTileSource)  # no cache folder: in memory
    assert resolve.slide_list(str(tmp_path / "s" / "*.svs")) == paths
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        resolve.slide_list(str(tmp_path / "nothing_here" / "*.svs"))


def test_an_index_built_from_a_relative_glob_verifies_from_another_folder(tmp_path, monkeypatch, capsys):
    """Slide paths are stored absolute (a relative glob from one folder used to fail `verify` from any other), and
    `info` prints the build settings once, in brackets."""
    from gpfm_jax.data.index.cli import main as index_main

    _copies(tmp_path / "s", 1)
    monkeypatch.chdir(tmp_path)
    assert index_main(["build", "--slides", "s/*.svs", "--out", "idx", "--workers", "1"]) == 0
    assert resolve.slide_list(tmp_path / "idx") == [str(tmp_path / "s" / "slide_000.svs")]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert index_main(["verify", str(tmp_path / "idx"), "--sample", "3"]) == 0
    assert index_main(["info", str(tmp_path / "idx")]) == 0
    built = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("built ")]
    assert len(built) == 1 and " s (" in built[0] and "from from" not in built[0], built
