"""gpfm-index, kind "files": the built index lists exactly the tiles of the JSON / folder sources, in their order; the
pipeline gives identical batches, substitutions and resumes through either; writes are atomic; the CLI."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpfm_jax.data import FolderSource, IndexSource, MaskingConfig, MultiCropConfig, PipelineConfig, make_iterator
from gpfm_jax.data.index import (IndexFormatError, TileIndex, TileIndexSource, build_files, build_from_folder,
                                 build_from_json, resolve)
from gpfm_jax.data.testing import cut_tiles, write_bad_files

REPO = Path(__file__).resolve().parents[1]
SEED = 5
SMALL = PipelineConfig(global_batch_size=4, multicrop=MultiCropConfig(global_size=28, local_size=14,
                       num_local_crops=2), masking=MaskingConfig(grid=(2, 2)))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _paths(src) -> list[str]:
    return [src.path(i) for i in range(len(src))]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Real tiles in 4 slide folders (one nested, one holding bad files), an index JSON with unsorted keys, absolute
    and relative dirs and an empty slide."""
    t = tmp_path_factory.mktemp("tree")
    tiles = cut_tiles(t / "tiles", n=22, size=48, subdirs=4)
    bad = write_bad_files(t / "tiles" / "slide_2")
    index: dict[str, list[str]] = {}
    for p in sorted(tiles + bad, key=lambda p: p.name, reverse=True):  # list order is kept, not sorted
        index.setdefault(str(p.parent.relative_to(t)), []).append(p.name)
    index[str(t / "tiles" / "slide_3")] = index.pop("tiles/slide_3")  # an absolute slide dir
    index["tiles/empty"] = []
    (t / "index.json").write_text(json.dumps(dict(reversed(list(index.items())))))
    return t


def test_json_build_lists_the_json_sources_tiles_in_order(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(build_files, "_CHUNK", 3)  # names flushed in many chunks, across slide boundaries
    out = build_from_json(tree / "index.json", tmp_path / "idx")
    ref = IndexSource(tree / "index.json")
    src = TileIndexSource(out)
    assert len(src) == len(ref) == 27
    assert _paths(src) == _paths(ref)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["kind"], m["num_tiles"], m["num_slides"], m["empty_slides"]) == ("files", 27, 4, 1)
    assert m["arrays"]["tile_name_offsets"]["bytes"] == 8 * (27 + 1)  # 8 bytes per tile (+1)
    good = [i for i in range(len(src)) if "bad_" not in src.path(i)]
    assert len(good) == 22
    for i in good[::5]:
        a, b = src[i], ref[i]
        assert a["path"] == b["path"] and np.array_equal(a["image"], b["image"])
    # another root: relative slide dirs move, absolute ones stay
    moved = _paths(TileIndexSource(out, root="/elsewhere"))
    assert moved == _paths(IndexSource(tree / "index.json", root="/elsewhere"))
    assert sum(p.startswith("/elsewhere/") for p in moved) == 27 - 5  # slide_3 (5 tiles) is absolute


def test_folder_build_matches_folder_source(tree, tmp_path):
    root = tmp_path / "tiles"
    cut_tiles(root, n=9, size=32, subdirs=2)
    (root / "slide_0" / "deeper").mkdir()
    (root / "slide_0" / "deeper" / "z.png").write_bytes((root / "slide_0" / "tile_0000.jpg").read_bytes())
    (root / "slide_0.jpg").write_bytes(b"sorts between slide_0/ and slide_1/ files")  # 'slide_0.jpg' < 'slide_0/'
    (root / ".hidden.png").write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")
    (root / "..JPG").write_bytes(b"x")  # Path('..JPG').suffix == '.JPG'
    os.symlink(root / "slide_1", root / "linked_dir")  # not descended into, as pathlib.rglob
    os.symlink(root / "slide_1" / "tile_0001.jpg", root / "slide_0" / "linked.jpg")  # a symlinked file counts
    out = build_from_folder(root, tmp_path / "idx")
    ref = FolderSource(root)
    assert _paths(TileIndexSource(out)) == _paths(ref)
    assert len(ref) == 9 + 1 + 1 + 1 + 1 + 1
    assert resolve.folder_source(out).__class__ is TileIndexSource


def test_pipeline_batches_substitutions_and_resume_are_identical(tree, tmp_path):
    """The same tiles through the JSON source and the built index: the same batches (bad files substituted the
    same way), and a run resumed from the index's iterator state continues bitwise like the JSON run."""
    out = build_from_json(tree / "index.json", tmp_path / "idx")
    ref_it = make_iterator(IndexSource(tree / "index.json"), SMALL, seed=SEED)
    ref = [next(ref_it) for _ in range(9)]  # 27 tiles / 4 = 6 per epoch: crosses an epoch
    it = make_iterator(TileIndexSource(out), SMALL, seed=SEED)
    got = [next(it) for _ in range(4)]
    assert all(_equal(a, b) for a, b in zip(got, ref))
    assert sum(int(b["num_skipped"]) for b in ref[:6]) >= 5  # the 5 bad files were met and replaced
    state = json.loads(json.dumps(it.get_state()))  # as the run stores it (checkpoint.DataStateHandler)
    resumed = make_iterator(TileIndexSource(out), SMALL, seed=SEED)
    resumed.set_state(state)
    assert all(_equal(next(resumed), b) for b in ref[4:9])


def test_pipeline_with_worker_processes(tree, tmp_path):
    """grain spawns its workers and pickles the dataset into them: the source travels as a folder name."""
    out = build_from_json(tree / "index.json", tmp_path / "idx")
    src = TileIndexSource(out)
    ref_it = make_iterator(IndexSource(tree / "index.json"), SMALL, seed=SEED)
    ref = [next(ref_it) for _ in range(3)]
    it = make_iterator(src, dataclasses.replace(SMALL, worker_count=1), seed=SEED)
    try:
        assert all(_equal(next(it), b) for b in ref)
    finally:
        it.close() if hasattr(it, "close") else None


def test_pickles_small_whatever_the_size(tmp_path):
    sizes = {}
    for n in (10, 50_000):
        (tmp_path / f"{n}.json").write_text(json.dumps({f"s{k}": [f"tile_{i:08d}.jpg" for i in range(n // 10)]
                                                        for k in range(10)}))
        src = TileIndexSource(build_from_json(tmp_path / f"{n}.json", tmp_path / f"idx{n}"))
        src.path(n - 1)  # maps the arrays
        sizes[n] = len(pickle.dumps(src))
        again = pickle.loads(pickle.dumps(src))
        assert again.path(n - 1) == src.path(n - 1) == str(tmp_path / "s9" / f"tile_{n // 10 - 1:08d}.jpg")
    assert sizes[50_000] < 4096 and abs(sizes[50_000] - sizes[10]) < 64


@pytest.mark.parametrize("text, match", [
    ('{"a": ["x.jpg"], "a": ["y.jpg"]}', "'a' appears twice"),
    ('{"a": "x.jpg"}', "'a' must map to a list"),
    ('{"a": ["x.jpg", ["nested"]]}', "'a' lists a array"),
    ('{"a": ["x.jpg", 3]}', "'a' lists a number"),
    ('["x.jpg"]', "must be a JSON object"),
    ('{"a": ["x.jpg"', "not valid JSON"),
    ('{"a": []}', "lists no tiles"),
])
def test_bad_json_is_a_clear_error_and_leaves_nothing(tmp_path, text, match):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        build_from_json(tmp_path / "bad.json", tmp_path / "idx")
    assert "bad.json" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # no index, no temporary folder


def test_half_written_or_damaged_index_is_refused(tree, tmp_path):
    out = build_from_json(tree / "index.json", tmp_path / "idx")
    with pytest.raises(FileExistsError, match="idx"):
        build_from_json(tree / "index.json", tmp_path / "idx")
    build_from_json(tree / "index.json", tmp_path / "idx", overwrite=True)
    (out / "manifest.json").rename(tmp_path / "manifest.json")
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        TileIndex(out)
    (tmp_path / "manifest.json").rename(out / "manifest.json")
    with open(out / "tile_name_offsets", "r+b") as f:
        f.truncate(16)
    with pytest.raises(IndexFormatError, match="tile_name_offsets has 16 bytes"):
        TileIndexSource(out)
    with pytest.raises(ValueError, match="not a gpfm-index"):
        resolve.tile_source(tmp_path)


def test_huge_json_points_to_gpfm_index(tree):
    with pytest.raises(ValueError, match="gpfm-index build --json"):
        IndexSource(tree / "index.json", max_bytes=100)
    assert isinstance(resolve.tile_source(tree / "index.json"), IndexSource)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gpfm_jax.data.index", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_build_info_verify(tree, tmp_path):
    r = _cli("build", "--json", tree / "index.json", "--out", tmp_path / "idx")
    assert r.returncode == 0, r.stderr
    assert "27 tiles in 4 slides" in r.stderr
    r = _cli("info", tmp_path / "idx", "--json")
    info = json.loads(r.stdout)
    assert (info["kind"], info["tiles"], info["slides"], info["build"]["from"]) == ("files", 27, 4, "json")
    r = _cli("verify", tmp_path / "idx", "--sample", 27)  # every tile: the 5 bad files are named
    assert r.returncode == 1
    assert sorted(Path(line.split(": ")[1]).name for line in r.stdout.splitlines()) == sorted(
        p.name for p in (tree / "tiles" / "slide_2").glob("bad_*"))
    assert "content hashes: ok" in r.stderr and "22 ok, 5 unreadable" in r.stderr
    with open(tmp_path / "idx" / "tile_names.bin", "r+b") as f:  # same size, different bytes
        f.write(b"Z")
    r = _cli("verify", tmp_path / "idx", "--sample", 0)
    assert r.returncode == 1 and "hash mismatch" in r.stdout and "tile_names.bin" in r.stdout
    r = _cli("build", "--json", tmp_path / "missing.json", "--out", tmp_path / "x")
    assert r.returncode == 2 and "missing.json" in r.stderr


def test_unusual_names_are_spelt_as_pathlib_spells_them(tmp_path):
    index = {"d/": ["sub/x.jpg", "./y.jpg", "a//b.jpg", "..", "z.jpg"], "./e": ["é.jpg", "w.png"], "/": ["r.jpg"],
             "//srv": ["s.jpg"], "f/./g": ["t.jpg"]}
    (tmp_path / "odd.json").write_text(json.dumps(index))
    src = TileIndexSource(build_from_json(tmp_path / "odd.json", tmp_path / "idx"))
    assert _paths(src) == _paths(IndexSource(tmp_path / "odd.json"))
    assert str(tmp_path / "d" / "sub" / "x.jpg") in _paths(src) and "//srv/s.jpg" in _paths(src)


def test_gpfm_train_data_settings_reach_the_sources(tree, tmp_path):
    """data.source/path as gpfm-train reads them: a built index folder, a JSON, a folder's index, slides as a list
    (tiled once into the cache, handle LRU size from the config); uint8 crops need ImageNet's mean/std."""
    from gpfm_jax.data.index import SlideIndexSource
    from gpfm_jax.data.testing import SLIDE
    from gpfm_jax.train import config as config_lib
    from gpfm_jax.train.config_schema import ConfigError, TrainConfig

    def cfg(**data):
        base = TrainConfig()
        return dataclasses.replace(base, data=dataclasses.replace(base.data, **data))

    built = build_from_json(tree / "index.json", tmp_path / "idx")
    src = config_lib.make_source(cfg(source="index", path=str(built)))
    assert isinstance(src, TileIndexSource) and len(src) == 27
    assert isinstance(config_lib.make_source(cfg(source="index", path=str(tree / "index.json"))), IndexSource)
    moved = config_lib.make_source(cfg(source="index", path=str(built), root="/moved"))
    assert moved.path(26).startswith("/moved/tiles/")  # (tile 0 is in the absolute slide dir)
    (tmp_path / "slides.txt").write_text(f"{SLIDE}\n")
    slides = config_lib.make_source(cfg(source="slides", path=str(tmp_path / "slides.txt"), slide_handles=3,
                                        tile_workers=1), tmp_path / "run")
    assert isinstance(slides, SlideIndexSource) and len(slides) == 41 and slides.handles.capacity == 3
    assert slides.origin.startswith(str(tmp_path / "run" / "slide_cache"))
    assert config_lib.slide_paths(slides.origin) == [str(SLIDE)]
    pipe = config_lib.data_config(cfg(source="index", path=str(built)))
    assert pipe.crop_dtype == "uint8" and pipe.masking.grid == (16, 16)  # 224 / patch 14
    odd = TrainConfig().data.multicrop
    odd = dataclasses.replace(odd, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="crop_dtype=float32"):
        config_lib.validate(dataclasses.replace(cfg(), teachers={t: "standin" for t in ("uni", "phikon", "conch")},
                                                data=dataclasses.replace(TrainConfig().data, path=str(built),
                                                                         multicrop=odd)), num_devices=1)
    config_lib.validate(dataclasses.replace(cfg(), teachers={t: "standin" for t in ("uni", "phikon", "conch")},
                                            data=dataclasses.replace(TrainConfig().data, path=str(built),
                                                                     multicrop=odd, crop_dtype="float32")),
                        num_devices=1)  # the host normalises with them: fine
