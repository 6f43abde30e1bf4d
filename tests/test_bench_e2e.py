"""gpfm-bench end to end on real tiles of the bundled CC0 slide (CMU-1-Small-Region), with two encoders given as
PyTorch weights and converted by gpfm_jax's converters: a random-init ViT (a bundle converted beforehand) and the
same architecture made blind (its patch embedding zeroed, so no pixel reaches the features, and its final
LayerNorm's scale and shift zeroed, so every feature is exactly 0.0; converted on the fly from its .pth by the suite).

Labels: each 112 px tissue tile (20x) is labelled by how much hematoxylin it holds: Ruifrok & Johnston colour
deconvolution (the H&E stain separation of scikit-image / QuPath) of its optical density, mean hematoxylin
density above or below the median of all tiles (two balanced classes; hematoxylin stains nuclei, so this is a
cellularity proxy measured on the pixels, independent of any encoder). Tiles of one 3x3-tile region share a
resampling unit and a fold (neighbouring tiles are correlated). The truth is known: the blind encoder is at chance
and any encoder that sees the pixels can beat it.

Why exactly 0.0 and not merely equal features: features that are equal but non-zero give equal similarities only up
to the last bit of the BLAS kernel that sums them. numpy's OpenBLAS (0.3.31) computes the cosine similarities of
identical vectors as 1.0000001 or 1.0000004 depending on where the pair sits in the matrix, with a pattern that
depends on the kernel it picks for the CPU (Haswell: two values; SkylakeX: all equal) and on its thread count. kNN
then takes the k "most similar" by that rounding noise, different neighbours for different queries, and the blind
kNN AUC was 0.4549 on an AMD EPYC (Zen 5) machine (Haswell kernel) and 0.5 with OPENBLAS_CORETYPE=SkylakeX. Zero
features make every similarity, logit and distance exactly the same number (sums of exact zeros, in any order), so
the blind encoder's scores are constant within each fold and its AUC and balanced accuracy are exactly 0.5 on any
CPU and BLAS.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, require
from gpfm_jax.encoder_bench import report as report_lib
from gpfm_jax.encoder_bench.run import run_suite

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

SLIDE = DATA_DIR / "cmu_small_region.svs"
TILE = 112
# Ruifrok & Johnston (2001) H&E-DAB stain vectors (scikit-image's rgb_from_hed)
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def hematoxylin_density(tile: np.ndarray) -> float:
    od = -np.log(np.maximum(tile.astype(np.float64), 1.0) / 255.0)
    return float((od.reshape(-1, 3) @ np.linalg.inv(RGB_FROM_HED))[:, 0].mean())


def _tiles(root: Path) -> Path:
    """PNG tiles of the slide's tissue and tiles.csv (path,label,region)."""
    import openslide
    from PIL import Image

    with openslide.OpenSlide(str(SLIDE)) as s:
        img = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    rows = []
    for r in range(img.shape[0] // TILE):
        for c in range(img.shape[1] // TILE):
            t = img[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
            mx = t.max(2).astype(np.float64)
            if ((mx - t.min(2)) / np.maximum(mx, 1) > 0.08).mean() < 0.5:
                continue  # background (saturation below 0.08 on over half of the tile)
            name = f"tiles/r{r:02d}_c{c:02d}.png"
            (root / "tiles").mkdir(parents=True, exist_ok=True)
            Image.fromarray(t).save(root / name)
            rows.append((name, hematoxylin_density(t), f"region_{r // 3:02d}_{c // 3:02d}"))
    median = np.median([h for _, h, _ in rows])
    with open(root / "tiles.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "region"])
        w.writerows((n, "hematoxylin_high" if h > median else "hematoxylin_low", reg) for n, h, reg in rows)
    return root / "tiles.csv"


def _vit_pth(path: Path, blind: bool) -> Path:
    """A ViT-Ti-like timm model (2 blocks, 56 px input) with random non-trivial weights, saved as .pth."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from conftest import randomize_torch_params_

    torch.manual_seed(0)
    model = VisionTransformer(img_size=56, patch_size=14, embed_dim=192, depth=2, num_heads=3, num_classes=0)
    randomize_torch_params_(model, seed=0)
    if blind:
        with torch.no_grad():
            model.patch_embed.proj.weight.zero_()
            model.patch_embed.proj.bias.zero_()
            model.norm.weight.zero_()  # the final LayerNorm: every feature exactly 0.0 (see the module docstring)
            model.norm.bias.zero_()
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    require("timm")
    from gpfm_jax.convert.student import convert_from_pytorch

    root = tmp_path_factory.mktemp("real")
    labels = _tiles(root)
    convert_from_pytorch(_vit_pth(root / "random.pth", blind=False), root / "random_vit")
    _vit_pth(root / "blind.pth", blind=True)
    (root / "suite.toml").write_text(f"""
name = "cmu-hematoxylin"
seed = 0
[encoders.random-vit]
bundle = "random_vit"
batch_size = 32
[encoders.blind-vit]
weights = "blind.pth"
convert = "vit"
batch_size = 32
[datasets.cmu]
csv = "{labels.name}"
patient = "region"
[tasks.knn]
type = "knn"
dataset = "cmu"
folds = 3
metrics = ["auc", "balanced_accuracy"]
[tasks.linear]
type = "linear"
dataset = "cmu"
folds = 3
epochs = 30
metrics = ["auc", "balanced_accuracy"]
[tasks.fewshot]
type = "fewshot"
dataset = "cmu"
folds = 3
shots = 8
episodes = 5
metrics = ["auc", "balanced_accuracy"]
[tasks.retrieval]
type = "retrieval"
dataset = "cmu"
folds = 3
""")
    stats = run_suite(root / "suite.toml", root / "out", progress=False)
    rep = report_lib.write_report(root / "out", replicates=500, seed=0)
    return root, stats, rep


def test_real_tiles_rank_the_seeing_encoder_first(benchmark):
    root, stats, rep = benchmark
    assert (stats.evaluated, stats.extracted, stats.converted) == (8, 2, 1)
    with open(root / "tiles.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 150 and len({r["region"] for r in rows}) > 30
    import h5py

    blind_features = []  # the features of the encoder converted by the suite (into the store's bundles/)
    for f in (root / "out" / "cache" / "features").glob("*.h5"):
        with h5py.File(f, "r") as h5:
            if Path(h5.attrs["encoder_path"]).parent.name == "bundles":
                blind_features.append(h5["features"][()])
    assert len(blind_features) == 1 and len(blind_features[0]) == len(rows)
    assert not np.any(blind_features[0])  # the premise: every feature exactly 0.0
    for task in ("knn", "linear", "fewshot"):
        blind = rep["tasks"][task]["metrics"]
        assert blind["auc"]["blind-vit"]["value"] == 0.5  # constant scores: exactly chance
        assert blind["balanced_accuracy"]["blind-vit"]["value"] == 0.5
        lo = blind["auc"]["random-vit"]["ci95"][0]
        assert lo > 0.75, (task, blind["auc"]["random-vit"])
    r = rep["ranking"]["per_encoder"]
    assert r["random-vit"]["avg_rank"] == 1.0 and r["random-vit"]["p_first"] == 1.0
    assert rep["ranking"]["win_probability"]["random-vit"]["blind-vit"] == 1.0
    assert (root / "out" / "report" / "cd_diagram.png").stat().st_size > 0


def test_cached_features_are_the_encoders_forward(benchmark):
    """The cached features are gpfm-extract's: the bundle's own forward on the preprocessed tile."""
    import h5py
    from PIL import Image

    from gpfm_jax.extract.encoder import load_feature_encoder
    from gpfm_jax.extract.preprocess import resize_tile

    root, _, _ = benchmark
    run = json.loads((root / "out" / "run.json").read_text())
    assert Path(run["encoders"]["blind-vit"]["bundle"]).parent.name == "bundles"  # converted into the store
    enc = load_feature_encoder(root / "random_vit", batch_size=4)
    found = 0
    for f in (root / "out" / "cache" / "features").glob("*.h5"):
        with h5py.File(f, "r") as h5:
            if Path(h5.attrs["encoder_path"]).name != "random_vit":
                continue
            paths = [p.decode() for p in h5["paths"][:4]]
            feats = h5["features"][:4]
        tiles = np.stack([resize_tile(np.asarray(Image.open(root / p).convert("RGB")), enc.input_size,
                                      enc.interpolation) for p in paths])
        np.testing.assert_allclose(feats, enc(tiles), atol=1e-5)
        found += 1
    assert found == 1


def test_real_slides_are_keyed_by_content(benchmark, tmp_path):
    """Slides go through gpfm-extract's slide runner, one feature file per slide *content*: two byte-identical
    copies are extracted once, a changed file again; a second call extracts nothing; the MIL view names every
    labelled slide."""
    import h5py

    from gpfm_jax.encoder_bench import datasets, features
    from gpfm_jax.encoder_bench.cache import Store
    from gpfm_jax.encoder_bench.suite import DatasetSpec, EncoderSpec

    root, _, _ = benchmark
    slides = tmp_path / "slides"
    slides.mkdir()
    data = SLIDE.read_bytes()
    (slides / "a.svs").write_bytes(data)
    (slides / "b.svs").write_bytes(data)  # same content as a
    (slides / "c.svs").write_bytes(data + b"\0" * 16)  # another file (trailing bytes: TIFF readers ignore them)
    (tmp_path / "labels.csv").write_text("slide_id,label\na,x\nb,y\nc,x\nmissing,y\n")
    ds = DatasetSpec("cohort", "slides", slides=str(slides), labels=str(tmp_path / "labels.csv"), tile_size=256)
    store = Store(tmp_path / "cache")
    events: list[tuple[str, dict]] = []
    log = lambda kind, **kw: events.append((kind, kw))  # noqa: E731
    enc = features.resolve_encoder(EncoderSpec("random-vit", bundle=str(root / "random_vit"), batch_size=16), store,
                                   log)
    items = datasets.slide_set(ds, store.hashes, store)
    assert items.slide_ids == ["a", "b", "c"]  # 'missing' has no slide file
    assert items.content["a"] == items.content["b"] != items.content["c"]
    view = features.slide_features(enc, ds, items, store, log)
    folder_key, stems = features.slide_feature_keys(enc, ds, items)
    assert len(list(store.slide_features_dir(folder_key).glob("*.h5"))) == 2
    assert sorted(p.name for p in view.iterdir()) == ["a.h5", "b.h5", "c.h5"]
    with h5py.File(view / "a.h5", "r") as fa, h5py.File(view / "c.h5", "r") as fc:
        assert fa["features"].shape[0] > 20 and fa["coords"].attrs["patch_size"] > 0
        np.testing.assert_allclose(fa["features"][()], fc["features"][()], atol=1e-5)  # same pixels
    assert [kw["items"] for kind, kw in events if kind == "extract"] == [2]
    features.slide_features(enc, ds, items, store, log)
    assert [kind for kind, _ in events].count("extract") == 1 and events[-1][0] == "features_cached"
