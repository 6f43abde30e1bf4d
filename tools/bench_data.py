"""Benchmark: DINOv2 multi-crop samples/s per CPU core, gpfm_jax.data (numpy + PIL) vs torchvision (DINOv2's recipe).

Both run in this process on one core (BLAS / torch threads pinned to 1), on the same 512x512 JPEG tiles, each sample
= read file + decode + 2 global + 8 local crops with colour ops + normalisation. Rounds alternate between the two so
that load from other processes hits both alike; medians and the median per-round ratio are reported.

    python tools/bench_data.py [--tiles DIR] [--samples 40] [--rounds 5] [--pipeline]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpfm_jax.data.augment import MultiCropConfig, multi_crop  # noqa: E402
from gpfm_jax.data.sources import FolderSource, read_image_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_tiles(out: Path, n: int = 16, size: int = 512) -> list[Path]:
    """512x512 JPEG tiles (quality 90, like GPFM's) cut at random offsets from the repo's real H&E images."""
    rng = np.random.default_rng(0)
    src = Image.open(REPO / "tests/data/tiatoolbox_target_image.png").convert("RGB")
    paths = []
    for i in range(n):
        x, y = (int(v) for v in rng.integers(0, 1000 - size, 2))
        p = out / f"tile_{i:03d}.jpg"
        src.crop((x, y, x + size, y + size)).save(p, quality=90)
        paths.append(p)
    return paths


def torchvision_dinov2(cfg: MultiCropConfig):
    """DINOv2's DataAugmentationDINO, composed from torchvision transforms with the same numbers."""
    import torch
    from torchvision import transforms as T

    torch.set_num_threads(1)
    bicubic = T.InterpolationMode.BICUBIC

    def blur(p: float):  # DINOv2's GaussianBlur(p) is RandomApply with 1 - p; here p is already effective
        return T.RandomApply([T.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)], p=p)

    geo_g = T.Compose([T.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=bicubic),
                       T.RandomHorizontalFlip(cfg.hflip_p)])
    geo_l = T.Compose([T.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale, interpolation=bicubic),
                       T.RandomHorizontalFlip(cfg.hflip_p)])
    jitter = T.Compose([
        T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
    ])
    norm = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    g1 = T.Compose([jitter, blur(cfg.blur_p_global1), norm])
    g2 = T.Compose([jitter, blur(cfg.blur_p_global2), T.RandomSolarize(128, p=cfg.solarize_p_global2), norm])
    loc = T.Compose([jitter, blur(cfg.blur_p_local), norm])

    def sample(path: Path):
        img = Image.open(path).convert("RGB")
        return {"global_crops": [g1(geo_g(img)), g2(geo_g(img))],
                "local_crops": [loc(geo_l(img)) for _ in range(cfg.num_local_crops)]}

    return sample


def ours(cfg: MultiCropConfig):
    def sample(path: Path, _i=[0]):
        _i[0] += 1
        return multi_crop(read_image_file(str(path)), np.random.default_rng([0, _i[0]]), cfg)

    return sample


def rate(fn, paths: list[Path], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(paths[i % len(paths)])
    return n / (time.perf_counter() - t0)


def bench_pipeline(tile_dir: Path, n_batches: int = 4, batch: int = 16) -> float:
    """samples/s of the full grain pipeline (batching, masks, grain overhead) with one read thread."""
    from gpfm_jax.data.pipeline import PipelineConfig, make_iterator

    n_tiles = len(FolderSource(tile_dir))
    epochs = -(-(n_batches + 1) * batch // n_tiles)  # finite, and drained below: no reads left in flight at exit
    cfg = PipelineConfig(global_batch_size=batch, read_threads=1, prefetch_records=batch, num_epochs=epochs)
    it = make_iterator(FolderSource(tile_dir), cfg)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    rate = n_batches * batch / (time.perf_counter() - t0)
    for _ in it:
        pass
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=Path, help="folder of tiles (default: 16 JPEGs cut from tests/data)")
    ap.add_argument("--samples", type=int, default=40, help="samples per round per pipeline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pipeline", action="store_true", help="also time the full grain pipeline (1 thread)")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for both

    cfg = MultiCropConfig()
    with tempfile.TemporaryDirectory() as tmp:
        tile_dir = args.tiles or Path(tmp)
        paths = sorted(tile_dir.glob("*.jp*g")) if args.tiles else make_tiles(tile_dir)
        tv, me = torchvision_dinov2(cfg), ours(cfg)
        rate(tv, paths, 4), rate(me, paths, 4)  # warm-up
        r_tv, r_me = [], []
        for _ in range(args.rounds):
            r_tv.append(rate(tv, paths, args.samples))
            r_me.append(rate(me, paths, args.samples))
        tv_s, me_s = statistics.median(r_tv), statistics.median(r_me)
        print(f"tiles: {len(paths)} x {Image.open(paths[0]).size} JPEG; {args.rounds} rounds x {args.samples} samples; "
              f"1 core (affinity {sorted(os.sched_getaffinity(0))})")
        print(f"torchvision (DINOv2 recipe): {tv_s:7.1f} samples/s/core   rounds {[round(r, 1) for r in r_tv]}")
        print(f"gpfm_jax.data (numpy+PIL):   {me_s:7.1f} samples/s/core   rounds {[round(r, 1) for r in r_me]}")
        paired = statistics.median(m / t for m, t in zip(r_me, r_tv))
        print(f"ratio: {me_s / tv_s:.2f}x (medians)   {paired:.2f}x (median of per-round ratios)")
        if args.pipeline:
            print(f"full grain pipeline (batch 16, 1 read thread): {bench_pipeline(tile_dir):.1f} samples/s")


if __name__ == "__main__":
    main()
