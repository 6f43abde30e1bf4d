"""Makes docs/mil_heatmap.png: the slide-level workflow (extract -> mil -> heatmap) on the bundled CC0 sample slide.

    python tools/demo_mil_heatmap.py [--out docs/mil_heatmap.png] [--workdir /tmp/mil_demo]

No pretrained weights exist offline, so this is a synthetic task with honest parts: a small random ViT bundle
extracts real features from tests/data/cmu_small_region.svs (96 px tiles at 20x); pseudo-slides are random subsets
of the other tiles, labelled 'positive' when 2-6 random tiles of the most densely stained 15% (lowest mean grey
level) are hidden among them, 'negative' otherwise. `gpfm-eval mil` trains ABMIL on them (5 folds) and saves attention;
`gpfm-eval heatmap` draws the real slide's attention, which should sit on that region.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import h5py
import numpy as np


def tiny_bundle(path: Path) -> Path:
    import flax.linen as nn
    import jax

    from gpfm_jax.convert.bundle import preprocessing, save_bundle
    from gpfm_jax.models.vit import ViTConfig, VisionTransformer

    cfg = ViTConfig(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, layerscale_init=None)
    shapes = jax.eval_shape(VisionTransformer(cfg).init, jax.random.key(0), np.zeros((1, 56, 56, 3), np.float32))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, leaf: (1.0 if jax.tree_util.keystr(p).endswith("['scale']") else 0.0)
        + 0.05 * rng.standard_normal(leaf.shape).astype(np.float32), nn.meta.unbox(shapes)["params"])
    save_bundle(path, params, {"encoder": "vit", "vit": cfg.to_dict(), "outputs": {"cls": 64, "patch": 64},
                               "preprocessing": preprocessing(56), "provenance": {"source": "random demo weights"}})
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "mil_heatmap.png"))
    ap.add_argument("--workdir", default="/tmp/mil_demo")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    slide = ROOT / "tests" / "data" / "cmu_small_region.svs"

    from gpfm_jax.evaluation import cli
    from gpfm_jax.extract import cli as extract_cli

    bundle = tiny_bundle(work / "bundle") if not (work / "bundle").exists() else work / "bundle"
    real = work / "extracted" / "cmu_small_region.h5"
    if not real.exists():
        assert extract_cli.main(["--encoder", str(bundle), "--input", str(slide), "--out", str(real.parent),
                                 "--tile-size", "96", "--batch-size", "32", "--no-progress"]) == 0
    with h5py.File(real, "r") as f:
        x, coords, span = f["features"][()], f["coords"][()], f["coords"].attrs["patch_size"]
    # The "lesion": the 15% most densely stained tiles (lowest mean grey level), a visible property of the tissue.
    import openslide

    with openslide.OpenSlide(str(slide)) as s:
        grey = np.array([np.asarray(s.read_region((int(cx), int(cy)), 0, (int(span), int(span))).convert("L")).mean()
                         for cx, cy in coords])
    region = grey <= np.quantile(grey, 0.15)
    feats = work / "cohort"
    feats.mkdir(parents=True, exist_ok=True)
    (feats / real.name).write_bytes(real.read_bytes())
    rng = np.random.default_rng(0)
    rows = ["slide_id,label", "cmu_small_region,positive"]
    others = np.flatnonzero(~region)
    for i in range(120):
        positive = i % 2 == 0
        keep = rng.choice(others, int(rng.integers(len(others) // 3, len(others))), replace=False)
        if positive:  # a few region tiles hidden among the others: any of them must be recognised
            keep = np.concatenate([keep, rng.choice(np.flatnonzero(region), int(rng.integers(2, 7)), replace=False)])
        keep = np.sort(keep)
        with h5py.File(feats / f"pseudo_{i:03d}.h5", "w") as f:
            f["features"] = x[keep]
            f["coords"] = coords[keep]
            f["coords"].attrs["patch_size"] = span
        rows.append(f"pseudo_{i:03d},{'positive' if positive else 'negative'}")
    (work / "labels.csv").write_text("\n".join(rows) + "\n")
    assert cli.main(["mil", "--features", str(feats), "--labels", str(work / "labels.csv"), "--model", "abmil",
                     "--folds", "5", "--epochs", "30", "--lr", "1e-3", "--bootstrap", "200",
                     "--save-attention", str(work / "attention"), "--out", str(work / "results.json")]) == 0
    assert cli.main(["heatmap", "--slide", str(slide), "--attention", str(work / "attention" / real.name),
                     "--features", str(real), "--out", args.out, "--max-size", "640", "--scale", "linear"]) == 0
    with h5py.File(work / "attention" / real.name, "r") as f:
        att = f["attention"][()]
    print(f"attention on the {int(region.sum())} densest of {len(x)} tiles: {att[region].sum():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
