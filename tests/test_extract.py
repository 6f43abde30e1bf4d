"""gpfm-extract on real H&E: tiles cut from the test images and the CC0 Aperio sample slide, with a small random ViT
bundle. The features must equal the encoder's direct forward on the same preprocessed tiles; interrupted slides
leave no file; reruns skip finished slides; bad input fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import DATA_DIR
from gpfm_jax.convert.bundle import preprocessing, save_bundle
from gpfm_jax.extract import cli, runner
from gpfm_jax.extract.encoder import load_feature_encoder
from gpfm_jax.extract.h5out import partial_path
from gpfm_jax.extract.preprocess import resize_tile
from gpfm_jax.models.vit import ViTConfig, VisionTransformer

SLIDE = DATA_DIR / "cmu_small_region.svs"
SIZE = 112  # the bundle's input size: tiles (128 px) and slide tiles (256 px) are resized to it, bicubic
CFG = ViTConfig(img_size=SIZE, patch_size=14, embed_dim=48, depth=2, num_heads=3, layerscale_init=None)


def _random_params(cfg: ViTConfig, seed: int = 0) -> dict:
    """Random non-trivial params of the right shapes (eval_shape: no eager init, which costs ~15 s on this CPU)."""
    import flax.linen as nn

    shapes = jax.eval_shape(VisionTransformer(cfg).init, jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if jax.tree_util.keystr(path).endswith("['scale']") else 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes)["params"])


def make_bundle(path: Path) -> tuple[Path, dict]:
    """The tiny random ViT bundle of these tests (also used by test_extract_multi.py)."""
    params = _random_params(CFG)
    meta = {"encoder": "vit", "vit": CFG.to_dict(), "outputs": {"cls": CFG.embed_dim, "patch": CFG.embed_dim},
            "preprocessing": preprocessing(SIZE), "provenance": {"source": "random test weights"}}
    save_bundle(path, params, meta)
    return path, params


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, dict]:
    return make_bundle(tmp_path_factory.mktemp("enc") / "tiny_vit")


@pytest.fixture(scope="module")
def encoder(bundle):
    return load_feature_encoder(bundle[0], batch_size=8)  # over the 8 fake CPU devices of conftest


def _direct(params: dict, tiles_uint8: list[np.ndarray]) -> np.ndarray:
    """Reference: PIL bicubic resize, NumPy normalisation, the module's own apply, one tile at a time (no padding)."""
    x = np.stack([resize_tile(t, SIZE, "bicubic") for t in tiles_uint8]).astype(np.float32) / np.float32(255.0)
    x = (x - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    module = VisionTransformer(CFG)
    return np.concatenate([np.asarray(module.apply({"params": params}, x[i : i + 1])["cls"]) for i in range(len(x))])


def _cut_tiles(root: Path, n: int = 10) -> list[Path]:
    from gpfm_jax.data.testing import cut_tiles

    return cut_tiles(root, n=n, size=128, ext=".png", subdirs=2)


def _read_h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in f}
        out["attrs"] = dict(f.attrs)
        out["coords_attrs"] = dict(f["coords"].attrs) if "coords" in f else {}
    return out


@pytest.mark.slow
def test_tile_folder_features_equal_direct_forward(bundle, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    files = _cut_tiles(tiles)
    (tiles / "slide_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # unreadable: skipped, listed
    out = tmp_path / "feats.h5"
    rc = cli.main(["--encoder", str(bundle[0]), "--input", str(tiles), "--out", str(out), "--batch-size", "4",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr()
    got = _read_h5(out)
    paths = [p.decode() for p in got["paths"]]
    assert paths == sorted(str(p.relative_to(tiles)) for p in files)  # relative, sorted, bad one left out
    assert [p.decode() for p in got["failed_paths"]] == [str(tiles / "slide_1" / "broken.png")]
    assert got["features"].dtype == np.float32 and got["features"].shape == (10, CFG.embed_dim)
    want = _direct(bundle[1], [np.asarray(Image.open(tiles / p).convert("RGB")) for p in paths])
    err = np.abs(got["features"] - want).max()
    assert err <= 1e-4, err
    assert got["attrs"]["encoder"] == "tiny_vit" and got["attrs"]["input_size"] == SIZE
    assert got["attrs"]["num_tiles"] == 10 and got["attrs"]["num_failed"] == 1
    assert not list(tmp_path.glob(".*partial"))

    # The same tiles through a JSON index {slide_dir: [files]} give the same rows.
    index = {d: sorted(p.name for p in (tiles / d).glob("tile_*.png")) for d in ("slide_0", "slide_1")}
    (tiles / "index.json").write_text(json.dumps(index))
    rc = cli.main(["--encoder", str(bundle[0]), "--input", str(tiles / "index.json"), "--out", str(tmp_path / "i.h5"),
                   "--batch-size", "3", "--no-progress"])
    assert rc == 0
    by_index = _read_h5(tmp_path / "i.h5")
    assert [p.decode() for p in by_index["paths"]] == paths
    np.testing.assert_allclose(by_index["features"], got["features"], atol=1e-5)


@pytest.mark.slow
def test_slide_features_and_coords_equal_direct_reads(bundle, tmp_path, capsys):
    import openslide

    out = tmp_path / "slide.h5"
    rc = cli.main(["--encoder", str(bundle[0]), "--input", str(SLIDE), "--out", str(out), "--batch-size", "8",
                   "--tile-size", "256", "--magnification", "20", "--no-progress"])
    assert rc == 0, capsys.readouterr()
    got = _read_h5(out)
    coords, feats = got["coords"], got["features"]
    n = len(coords)
    assert n >= 10 and feats.shape == (n, CFG.embed_dim) and coords.dtype == np.int64 and coords.shape == (n, 2)
    assert len({tuple(c) for c in coords}) == n
    assert (coords >= 0).all() and (coords[:, 0] + 256 <= 2220).all() and (coords[:, 1] + 256 <= 2967).all()
    attrs = got["attrs"]
    assert attrs["tile_size"] == 256 and attrs["magnification"] == 20.0 and attrs["level0_tile_size"] == 256
    assert attrs["mpp"] == pytest.approx(0.499) and attrs["encoder"] == "tiny_vit" and attrs["num_tiles"] == n
    assert got["coords_attrs"]["patch_level"] == 0 and got["coords_attrs"]["patch_size"] == 256  # CLAM's reader
    # Reference tiles read straight from openslide at the stored coordinates (level 0, 256 px: 20x slide at 20x).
    slide = openslide.OpenSlide(str(SLIDE))
    tiles = [np.asarray(slide.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB")) for x, y in coords]
    err = np.abs(feats - _direct(bundle[1], tiles)).max()
    assert err <= 1e-4, err


def _slide_folder(root: Path, names: list[str]) -> Path:
    root.mkdir()
    for name in names:
        shutil.copy(SLIDE, root / name)
    return root


def test_interrupted_slide_leaves_no_file_and_rerun_skips_finished(encoder, tmp_path):
    slides_dir = _slide_folder(tmp_path / "slides", ["a.svs", "b.svs", "c.svs"])
    slides = sorted(slides_dir.glob("*.svs"))
    out = tmp_path / "out"
    out.mkdir()
    partial_path(out / "c.h5").write_bytes(b"left by a killed run")  # e.g. SIGKILL: must never count as done
    tiling = runner.SlideOptions(tile_size=256, magnification=20.0)
    loader = runner.LoaderOptions(workers=2, progress=False)

    calls = {"n": 0}
    real_dispatch = encoder.dispatch

    def crashing(tiles):
        calls["n"] += 1
        if calls["n"] == 7:  # slide a's 25 tiles end in batch 4 (of 8); batch 7 is in the middle of slide b
            raise KeyboardInterrupt
        return real_dispatch(tiles)

    encoder.dispatch = crashing
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.extract_slides(encoder, slides, out, tiling, loader)
    finally:
        encoder.dispatch = real_dispatch
    assert (out / "a.h5").is_file()
    assert not (out / "b.h5").exists() and not partial_path(out / "b.h5").exists()
    first = _read_h5(out / "a.h5")
    mtime = (out / "a.h5").stat().st_mtime_ns

    report = runner.extract_slides(encoder, slides, out, tiling, loader)
    assert report.skipped == [slides_dir / "a.svs"]
    assert [s for s, _ in report.done] == [slides_dir / "b.svs", slides_dir / "c.svs"] and not report.failed
    assert (out / "a.h5").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "b.h5", "c.h5"]  # the stale .partial is gone too
    for name in ("b.h5", "c.h5"):  # the same slide content gives the same rows
        again = _read_h5(out / name)
        np.testing.assert_array_equal(again["coords"], first["coords"])
        np.testing.assert_allclose(again["features"], first["features"], atol=1e-6)


def test_unreadable_slide_is_skipped_and_reported(bundle, tmp_path, capsys):
    slides_dir = _slide_folder(tmp_path / "slides", ["good1.svs", "good2.svs"])
    (slides_dir / "broken.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    truncated = SLIDE.read_bytes()[:20000]
    (slides_dir / "truncated.svs").write_bytes(truncated)
    out = tmp_path / "out"
    rc = cli.main(["--encoder", str(bundle[0]), "--input", str(slides_dir), "--out", str(out), "--batch-size", "8",
                   "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "FAILED" in text and "broken.svs" in text and "truncated.svs" in text
    assert sorted(p.name for p in out.iterdir()) == ["good1.h5", "good2.h5"]
    assert "2 done" in text and "2 failed" in text


def test_training_checkpoint_as_encoder_gives_the_bundle_features(bundle, tmp_path):
    import orbax.checkpoint as ocp

    from gpfm_jax.convert.bundle import BUNDLE_FORMAT

    ckpt = tmp_path / "ckpt"
    with ocp.CheckpointManager(ckpt) as manager:
        state = {"teacher": {"backbone": bundle[1]}, "student": {"backbone": jax.tree.map(np.zeros_like, bundle[1])}}
        manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    (ckpt / "encoder.json").write_text(json.dumps({"format": BUNDLE_FORMAT, "version": 1, "encoder": "vit",
                                                   "vit": CFG.to_dict(), "preprocessing": preprocessing(SIZE)}))
    tiles = [t[:128, :128] for t in _tiles_from_images()]
    from_ckpt = load_feature_encoder(ckpt, batch_size=4)(np.stack([resize_tile(t, SIZE) for t in tiles]))
    assert np.abs(from_ckpt - _direct(bundle[1], tiles)).max() <= 1e-4


def _tiles_from_images() -> list[np.ndarray]:
    from conftest import real_rgb_tiles

    return real_rgb_tiles()[:3]


def test_bfloat16_compute_stays_close(bundle):
    tiles = np.stack([resize_tile(t, SIZE) for t in _tiles_from_images()])
    fp32 = load_feature_encoder(bundle[0], batch_size=4)(tiles)
    bf16 = load_feature_encoder(bundle[0], batch_size=4, dtype="bfloat16")(tiles)
    assert bf16.dtype == np.float32
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99, cos


def test_bad_encoder_and_empty_inputs_fail_clearly(bundle, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    _cut_tiles(tiles, n=2)
    not_bundle = tmp_path / "weights"
    not_bundle.mkdir()
    (not_bundle / "model.pth").write_bytes(b"not a bundle")
    for enc, needle in ((not_bundle, "not an encoder bundle"), (tmp_path / "missing", "no such folder")):
        rc = cli.main(["--encoder", str(enc), "--input", str(tiles), "--out", str(tmp_path / "x.h5"), "--no-progress"])
        assert rc == 2 and needle in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    rc = cli.main(["--encoder", str(bundle[0]), "--input", str(empty), "--out", str(tmp_path / "x.h5"), "--no-progress"])
    assert rc == 2 and "no image files found" in capsys.readouterr().err
    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    (bad_only / "a.jpg").write_bytes(b"")
    rc = cli.main(["--encoder", str(bundle[0]), "--input", str(bad_only), "--out", str(tmp_path / "y.h5"),
                   "--no-progress"])
    assert rc == 2 and "none of the 1 tiles could be read" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()
    assert not list(tmp_path.glob(".*.partial"))
    rc = cli.main(["--encoder", str(bundle[0]), "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "z.h5")])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err


def test_tile_read_error_mid_slide_and_empty_slide(encoder, tmp_path, monkeypatch):
    """A read error in one slide (batches run across slides) drops only that slide; a slide without tissue gets
    an empty, complete file; the other slides' rows are routed to the right files."""
    import dataclasses

    from gpfm_jax.extract import slide_io

    slides_dir = _slide_folder(tmp_path / "slides", ["a.svs", "bad_tile.svs", "empty.svs", "z.svs"])
    real_plan, real_call = slide_io.plan_slide, slide_io.SlideReader.__call__

    def plan(path, opts):
        p = real_plan(path, opts)
        return dataclasses.replace(p, coords=p.coords[:0]) if Path(path).name == "empty.svs" else p

    def read(self, index):
        if Path(self.plan.path).name == "bad_tile.svs" and index == 11:
            raise OSError("simulated corrupt JPEG tile")
        return real_call(self, index)

    monkeypatch.setattr(runner, "plan_slide", plan)
    monkeypatch.setattr(slide_io.SlideReader, "__call__", read)
    out = tmp_path / "out"
    report = runner.extract_slides(encoder, sorted(slides_dir.glob("*.svs")), out,
                                   runner.SlideOptions(tile_size=256), runner.LoaderOptions(workers=2, progress=False))
    assert len(report.failed) == 1 and report.failed[0][0].name == "bad_tile.svs"
    assert report.failed[0][1].endswith("OSError: simulated corrupt JPEG tile"), report.failed
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "empty.h5", "z.h5"]
    a, z, empty = (_read_h5(out / f"{n}.h5") for n in ("a", "z", "empty"))
    assert empty["features"].shape == (0, CFG.embed_dim) and empty["coords"].shape == (0, 2)
    np.testing.assert_array_equal(a["coords"], z["coords"])
    np.testing.assert_allclose(a["features"], z["features"], atol=1e-6)
    assert [(s.name, n) for s, n in report.done] == [("a.svs", 25), ("empty.svs", 0), ("z.svs", 25)]
