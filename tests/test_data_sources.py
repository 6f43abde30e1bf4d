"""Tile sources on real H&E data: folder, GPFM JSON index, TFDS ArrayRecord, whole-slide tiling; bad input."""

import json
import os

import numpy as np
import pytest

from gpfm_jax.data import slides
from gpfm_jax.data.sources import (BadImageError, FolderSource, IndexSource, RobustSource, SlideTileSource,
                                   TfdsSource, decode_image, read_image_file)
from gpfm_jax.data.testing import SLIDE, cut_tiles, write_bad_files, write_odd_mode_files


def test_folder_source_reads_real_tiles(tmp_path):
    paths = cut_tiles(tmp_path, n=6, size=96, subdirs=2) + cut_tiles(tmp_path, n=2, size=64, ext=".png", seed=1)
    (tmp_path / "notes.txt").write_text("ignored")
    src = FolderSource(tmp_path)
    assert len(src) == len(set(paths))
    rec = src[0]
    assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3 and rec["image"].shape[2] == 3
    assert rec["path"] == sorted(str(p) for p in set(paths))[0]
    assert rec["image"].std() > 5  # real tissue, not a blank


def test_index_source(tmp_path):
    paths = cut_tiles(tmp_path / "tiles", n=5, size=64, subdirs=2)
    index = {}
    for p in paths:
        index.setdefault(str(p.parent.relative_to(tmp_path)), []).append(p.name)
    (tmp_path / "index.json").write_text(json.dumps(index))
    src = IndexSource(tmp_path / "index.json")
    assert len(src) == 5
    assert {src[i]["path"] for i in range(5)} == {str(p) for p in paths}
    # absolute slide dirs and an explicit root
    abs_index = {str(tmp_path / k): v for k, v in index.items()}
    (tmp_path / "abs.json").write_text(json.dumps(abs_index))
    assert len(IndexSource(tmp_path / "abs.json", root="/elsewhere")) == 5


def test_empty_or_missing_inputs_name_the_path(tmp_path):
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="empty.json"):
        IndexSource(tmp_path / "empty.json")
    (tmp_path / "nolist.json").write_text('{"a": []}')
    with pytest.raises(ValueError, match="nolist.json"):
        IndexSource(tmp_path / "nolist.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        IndexSource(tmp_path / "missing.json")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        FolderSource(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        FolderSource(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        slides.tile_coordinates(tmp_path / "nope.svs", 224, 20)
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        SlideTileSource([tmp_path / "nope.svs"])


def test_decode_bad_bytes_raise_bad_image(tmp_path):
    for p in write_bad_files(tmp_path):
        with pytest.raises(BadImageError, match=p.name):
            read_image_file(str(p))
    with pytest.raises(BadImageError, match="cannot read"):
        read_image_file(str(tmp_path / "missing.jpg"))


def test_decode_odd_modes_to_rgb(tmp_path):
    for p in write_odd_mode_files(tmp_path):
        img = read_image_file(str(p))
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3), p.name
        assert img.std() > 3, p.name
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent -> white, like glass
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert (decode_image(buf.getvalue()) == 255).all()


def test_robust_source_substitutes_and_counts(tmp_path):
    cut_tiles(tmp_path, n=6, size=64)
    bad = write_bad_files(tmp_path / "slide_0")
    src = FolderSource(tmp_path)
    robust = RobustSource(src, max_retries=8)
    recs = [robust[i] for i in range(len(src))]
    bad_set = {str(p) for p in bad}
    assert all(r["path"] not in bad_set for r in recs)
    skipped = sum(r["num_skipped"] for r in recs)
    assert skipped >= len(bad)
    assert [robust[i]["path"] for i in range(len(src))] == [r["path"] for r in recs]  # deterministic


def test_all_bad_source_is_a_clear_error(tmp_path):
    write_bad_files(tmp_path / "bad")
    robust = RobustSource(FolderSource(tmp_path / "bad"), max_retries=16)
    with pytest.raises(RuntimeError, match=str(tmp_path / "bad")):
        robust[0]


def test_tfds_builder_and_source(tmp_path):
    from gpfm_jax.data.tfds_builder import build_tile_dataset

    cut_tiles(tmp_path / "tiles", n=4, size=64, subdirs=2)
    write_bad_files(tmp_path / "tiles" / "slide_0")
    builder_dir = build_tile_dataset(tmp_path / "tiles", tmp_path / "tfds")
    src = TfdsSource(builder_dir=builder_dir)
    assert len(src) == 4 + 5
    good, bad = 0, 0
    for i in range(len(src)):
        try:
            rec = src[i]
        except BadImageError:
            bad += 1
            continue
        good += 1
        assert rec["image"].shape == (64, 64, 3)
        original = read_image_file(str(tmp_path / "tiles" / rec["path"]))
        assert np.array_equal(rec["image"], original)  # bytes stored unchanged
    assert (good, bad) == (4, 5)
    assert sum(RobustSource(src)[i]["num_skipped"] for i in range(len(src))) >= 5


def test_slide_info_and_grid_on_cmu_slide(tmp_path):
    s = slides.open_slide(SLIDE)
    info = slides.slide_info(s, str(SLIDE))
    assert (info.width, info.height, info.mpp, info.base_magnification) == (2220, 2967, 0.499, 20.0)
    grid = slides.tile_coordinates(SLIDE, 224, 20)
    c = grid.coords
    assert c.ndim == 2 and c.shape[1] == 2 and c.dtype == np.int64
    n_all = (2220 // 224) * (2967 // 224)
    assert 10 < len(c) < n_all  # tissue only, background dropped
    assert (c[:, 0] % 224 == 0).all() and (c[:, 1] % 224 == 0).all()
    assert (c[:, 0] + 224 <= 2220).all() and (c[:, 1] + 224 <= 2967).all()
    # tissue tiles are not glass: mean saturation well above a background tile's
    tiles = np.stack([slides.read_grid_tile(s, grid, i) for i in range(0, len(c), 5)])
    assert tiles.shape[1:] == (224, 224, 3) and tiles.dtype == np.uint8
    glass = slides.read_tile(s, 0, 0, 224, 224)
    sat = lambda t: (t.max(-1).astype(int) - t.min(-1)).mean()  # noqa: E731
    assert min(sat(t) for t in tiles) > 2 * sat(glass)
    # 10x: each tile spans 448 level-0 pixels, read at level 0 and downscaled
    g10 = slides.tile_coordinates(SLIDE, 224, 10)
    assert g10.level0_size == 448 and 0 < len(g10.coords) < len(c)
    assert slides.read_grid_tile(s, g10, 0).shape == (224, 224, 3)
    with pytest.raises(ValueError, match="20.0x"):
        slides.tile_coordinates(SLIDE, 224, 40)
    s.close()


def test_slide_grid_cache(tmp_path, monkeypatch):
    slide = tmp_path / "slide.svs"
    slide.write_bytes(SLIDE.read_bytes())
    g1 = slides.tile_coordinates(slide, 256, 20, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_open(*a, **k):
        raise AssertionError("slide re-analysed despite the cache")

    monkeypatch.setattr(slides, "open_slide", no_open)
    g2 = slides.tile_coordinates(slide, 256, 20, cache_dir=tmp_path / "cache")
    assert np.array_equal(g1.coords, g2.coords) and g2.info == g1.info and g2.level0_size == 256
    # other parameters or a touched file: a new entry
    monkeypatch.undo()
    slides.tile_coordinates(slide, 256, 20, min_tissue=0.9, cache_dir=tmp_path / "cache")
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    slides.tile_coordinates(slide, 256, 20, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_slide_tile_source(tmp_path):
    import pickle

    src = SlideTileSource([SLIDE, SLIDE], tile_size=224, magnification=20, cache_dir=tmp_path)
    n = len(slides.tile_coordinates(SLIDE, 224, 20).coords)
    assert len(src) == 2 * n
    rec = src[n]  # first tile of the second slide
    assert rec["slide"] == 1 and rec["image"].shape == (224, 224, 3) and rec["coords"].shape == (2,)
    src2 = pickle.loads(pickle.dumps(src))  # goes to grain workers
    assert np.array_equal(src2[3]["image"], src[3]["image"])


def test_otsu_threshold_separates_two_modes():
    v = np.concatenate([np.full(1000, 10), np.full(1000, 200)]).astype(np.uint8)
    t = slides.otsu_threshold(v)
    assert 10 <= t < 200
