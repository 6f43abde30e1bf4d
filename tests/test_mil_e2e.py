"""Slide-level workflow end to end on the bundled CC0 slide: gpfm-extract's API with a small random ViT bundle ->
`gpfm-eval mil --save-attention` -> `gpfm-eval heatmap`; and every bad input of `gpfm-eval mil` (a labelled slide
without features, features without a label, empty / NaN feature files, one class, a fold without events) gives a
clear warning or error naming the slide or fold, with results.json either whole or untouched."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import DATA_DIR
from gpfm_jax.evaluation import cli

SLIDE = DATA_DIR / "cmu_small_region.svs"
SMALL = ["--hidden-dim", "16", "--attention-dim", "8", "--epochs", "3", "--bootstrap", "20", "--seed", "0"]


def _tiny_bundle(root: Path) -> Path:
    """A 2-block ViT-Ti-like bundle with random non-trivial weights (eval_shape: no eager init)."""
    import flax.linen as nn

    from gpfm_jax.convert.bundle import preprocessing, save_bundle
    from gpfm_jax.models.vit import ViTConfig, VisionTransformer

    cfg = ViTConfig(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, layerscale_init=None)
    shapes = jax.eval_shape(VisionTransformer(cfg).init, jax.random.key(0), np.zeros((1, 56, 56, 3), np.float32))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, leaf: (1.0 if jax.tree_util.keystr(p).endswith("['scale']") else 0.0)
        + 0.05 * rng.standard_normal(leaf.shape).astype(np.float32), nn.meta.unbox(shapes)["params"])
    meta = {"encoder": "vit", "vit": cfg.to_dict(), "outputs": {"cls": 32, "patch": 32},
            "preprocessing": preprocessing(56), "provenance": {"source": "random test weights"}}
    save_bundle(root / "bundle", params, meta)
    return root / "bundle"


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    """features/cmu_small_region.h5 from gpfm-extract's slide runner."""
    from gpfm_jax.extract import runner
    from gpfm_jax.extract.encoder import load_feature_encoder

    root = tmp_path_factory.mktemp("e2e")
    encoder = load_feature_encoder(_tiny_bundle(root), batch_size=16)
    report = runner.extract_slides(encoder, [SLIDE], root / "features", runner.SlideOptions(tile_size=256),
                                   runner.LoaderOptions(workers=2, progress=False))
    assert not report.failed and len(report.done) == 1
    return root / "features" / "cmu_small_region.h5"


def _derive_cohort(src: Path, root: Path, n: int = 15) -> tuple[Path, list[str]]:
    """The extracted slide plus n pseudo-slides made of random subsets of its tiles (same attrs), so a cohort of
    real gpfm-extract files exists; labels alternate."""
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    with h5py.File(src, "r") as f:
        x, coords, span = f["features"][()], f["coords"][()], f["coords"].attrs["patch_size"]
    (feats / src.name).write_bytes(src.read_bytes())
    rng = np.random.default_rng(0)
    ids = [src.stem]
    for i in range(n):
        keep = np.sort(rng.choice(len(x), int(rng.integers(5, len(x))), replace=False))
        with h5py.File(feats / f"pseudo_{i:02d}.h5", "w") as f:
            f["features"] = x[keep] + 0.01 * i
            f["coords"] = coords[keep]
            f["coords"].attrs["patch_size"] = span
        ids.append(f"pseudo_{i:02d}")
    return feats, ids


def test_extract_mil_heatmap_end_to_end(extracted, tmp_path, capsys):
    feats, ids = _derive_cohort(extracted, tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{s},{'tumor' if i % 2 else 'normal'}\n"
                                                  for i, s in enumerate(ids)))
    out, att_dir = tmp_path / "results.json", tmp_path / "attention"
    assert cli.main(["mil", "--features", str(feats), "--labels", str(labels), "--task", "classification",
                     "--model", "abmil", "--folds", "4", "--save-attention", str(att_dir), "--out", str(out),
                     *SMALL]) == 0
    res = json.loads(out.read_text())
    assert len(res["folds"]) == 4 and res["classes"] == ["normal", "tumor"]
    assert sorted(p["slide_id"] for p in res["predictions"]) == sorted(ids)  # every slide tested exactly once
    assert set(res["summary"]) == {"accuracy", "auc", "balanced_accuracy", "macro_f1"}
    assert res["num_compiles"] <= 2 * len(res["buckets"])
    assert "compiles:" in capsys.readouterr().out

    with h5py.File(extracted, "r") as f:
        coords, n = f["coords"][()], len(f["features"])
    with h5py.File(att_dir / "cmu_small_region.h5", "r") as f:
        att = f["attention"][()]
        np.testing.assert_array_equal(f["coords"][()], coords)
    assert att.shape == (n,) and abs(att.sum() - 1) < 1e-5 and (att > 0).all()

    png = tmp_path / "cmu.png"
    assert cli.main(["heatmap", "--slide", str(SLIDE), "--attention", str(att_dir / "cmu_small_region.h5"),
                     "--features", str(extracted), "--out", str(png), "--max-size", "512"]) == 0
    import openslide

    with openslide.OpenSlide(str(SLIDE)) as s:
        thumb = np.asarray(s.get_thumbnail((512, 512)).convert("RGB"))
        scale = thumb.shape[1] / s.dimensions[0]
    img = np.asarray(Image.open(png).convert("RGB"))
    h, w = thumb.shape[:2]
    assert img.shape[0] == h and img.shape[1] > w  # the thumbnail plus a colour bar on the right
    inside, near = np.zeros((h, w), bool), np.zeros((h, w), bool)
    with h5py.File(extracted, "r") as f:
        span = float(f["coords"].attrs["patch_size"])
    for x, y in coords:
        x0, y0, x1, y1 = x * scale, y * scale, (x + span) * scale, (y + span) * scale
        inside[int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1] = True
        near[max(int(y0) - 1, 0) : int(y1) + 2, max(int(x0) - 1, 0) : int(x1) + 2] = True
    assert inside.sum() > 0.2 * h * w and (~near).sum() > 0.05 * h * w
    np.testing.assert_array_equal(img[:, :w][~near], thumb[~near])  # background and untiled tissue untouched
    covered = inside
    assert np.abs(img[:, :w][covered].astype(int) - thumb[covered]).mean() > 10  # tiles are coloured


def _cohort(root: Path, sizes: list[int], dim: int = 8, nan: str | None = None, empty: str | None = None) -> Path:
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i, n in enumerate(sizes):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        name = f"s{i:02d}"
        if name == nan:
            x[3, 2] = np.nan
        if name == empty:
            x = x[:0]
        with h5py.File(feats / f"{name}.h5", "w") as f:
            f["features"] = x
            f["coords"] = np.zeros((len(x), 2), np.int64)
    return feats


def _run(feats, labels, out, *extra):
    return cli.main(["mil", "--features", str(feats), "--labels", str(labels), "--out", str(out), *SMALL, *extra])


@pytest.mark.slow
def test_mil_bad_inputs_name_the_slide(tmp_path, capsys):
    feats = _cohort(tmp_path, [20] * 12)
    out = tmp_path / "results.json"
    labels = tmp_path / "labels.csv"
    rows = [f"s{i:02d},{'ab'[i % 2]}" for i in range(11)] + ["ghost_slide,a"]  # s11 unlabelled, ghost has no file
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    assert _run(feats, labels, out, "--folds", "3") == 0
    err = capsys.readouterr().err
    assert "ghost_slide" in err and "no feature file" in err
    assert "s11" in err and "no label" in err
    res = json.loads(out.read_text())
    assert res["missing_features"] == ["ghost_slide"] and res["unlabelled_feature_files"] == ["s11"]
    before = out.read_text()

    (tmp_path / "nan").mkdir()
    bad = _cohort(tmp_path / "nan", [20] * 11, nan="s04")
    assert _run(bad, labels, out, "--folds", "3") == 2
    err = capsys.readouterr().err
    assert "s04.h5" in err and "NaN" in err
    (tmp_path / "empty").mkdir()
    bad = _cohort(tmp_path / "empty", [20] * 11, empty="s07")
    assert _run(bad, labels, out, "--folds", "3") == 2
    err = capsys.readouterr().err
    assert "s07.h5" in err and "empty feature file" in err

    one = tmp_path / "one.csv"
    one.write_text("slide_id,label\n" + "".join(f"s{i:02d},a\n" for i in range(11)))
    assert _run(feats, one, out, "--folds", "3") == 2
    assert "only one class ('a')" in capsys.readouterr().err
    assert out.read_text() == before  # failed runs leave the previous results whole
    assert not list(tmp_path.glob(".results.json*"))


def test_mil_survival_fold_without_events(tmp_path, capsys):
    feats = _cohort(tmp_path, [15] * 12)
    out = tmp_path / "results.json"
    labels = tmp_path / "surv.csv"
    split = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    event = [1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0]  # the test split has no event
    labels.write_text("slide_id,time,event,split\n" + "".join(
        f"s{i:02d},{10 + 3 * i},{e},{sp}\n" for i, (e, sp) in enumerate(zip(event, split))))
    assert _run(feats, labels, out, "--task", "survival") == 0
    assert "fold 0: no event in the test set" in capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["folds"][0]["c_index"]["value"] is None and res["summary"]["c_index"]["folds_used"] == 0
    assert len(res["bin_edges"]) == 5

    event = [0] * 6 + [1] * 6  # no event among the training slides
    labels.write_text("slide_id,time,event,split\n" + "".join(
        f"s{i:02d},{10 + 3 * i},{e},{sp}\n" for i, (e, sp) in enumerate(zip(event, split))))
    assert _run(feats, labels, out, "--task", "survival", "--loss", "cox") == 2
    assert "fold 0: no event in the training set" in capsys.readouterr().err
