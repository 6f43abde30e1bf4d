#!/usr/bin/env python
"""End-to-end slide feature extraction, tiles/s: gpfm-extract (JAX) vs the same encoder in timm driven by a standard
PyTorch DataLoader loop (CLAM's extract_features_fp pattern), same slides, same tiles, same run.

    python tools/bench_extract.py [--arch small|base|large] [--copies 8] [--repeats 2] [--batch-size 16]

Both sides do everything a user waits for: tissue tiling (the same gpfm_jax.data.slides grid), reading tiles with
openslide, bicubic resize to 224 (PIL), normalisation, the ViT forward, writing features + coords to one HDF5 file
per slide. Weights are one random timm `vit_*_patch14_dinov2` converted with tools/convert_from_pytorch.py, and the
two sides' features are compared. A warm-up pass per side (JIT compile, torch first-call costs) is not timed, but
the JAX compile time is reported. Passes are interleaved (JAX, timm, JAX, ...) so machine noise hits both; the
median is reported. The slide is tests/data/cmu_small_region.svs copied `--copies` times.

    python tools/bench_extract.py --devices 1,2,4,8 [--arch small] [--batch-per-device 8] [--copies 8]

Scaling over devices (XLA CPU devices forced with --xla_force_host_platform_device_count when there is no
accelerator): for each device count, gpfm-extract's slide loop end to end (tiles/s), and where a tile's time goes,
each part timed alone: read+decode of a slide tile (openslide read_region, one thread), read (file bytes) and decode
(PIL) of the same tile saved as a 256 px JPEG, resize to 224 (PIL bicubic), transfer (host uint8 batch -> device
shards, per tile) and forward (the jitted ViT on device-resident tiles, per tile). The weights are random (no timm
needed in this mode). Per-device batch is fixed (weak scaling).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TIMM_ARCHS = {"small": "vit_small_patch14_dinov2", "base": "vit_base_patch14_dinov2",
              "large": "vit_large_patch14_dinov2"}


def _slide_copies(work: Path, copies: int) -> list[Path]:
    """`copies` copies of the sample slide under work/slides (distinct paths: one output each)."""
    folder = work / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    slides = [folder / f"slide{i}.svs" for i in range(copies)]
    for slide in slides:
        shutil.copy(REPO / "tests/data/cmu_small_region.svs", slide)
    return slides


def _timm_model(arch: str):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(TIMM_ARCHS[arch], img_size=224, init_values=1e-5, num_classes=0, pretrained=False)
    with torch.no_grad():  # non-trivial LayerScales, so every block matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _bundle(model, workdir: Path) -> Path:
    import torch

    from tools.convert_from_pytorch import main as convert

    pth, out = workdir / "timm.pth", workdir / "bundle"
    torch.save(model.state_dict(), pth)
    if convert(["--torch", str(pth), "--out", str(out)]) != 0:
        raise SystemExit("conversion failed")
    return out


class _TileDataset:
    """torch Dataset in CLAM's style: one slide, its coords, read_region + torchvision transforms per tile."""

    def __init__(self, slide_path: str, coords: np.ndarray, level0_size: int, tile_size: int):
        from torchvision import transforms

        self.slide_path, self.coords, self.level0_size, self.tile_size = slide_path, coords, level0_size, tile_size
        self.slide = None
        self.transform = transforms.Compose([
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int):
        import openslide
        from PIL import Image

        if self.slide is None:  # opened lazily, once per worker process
            self.slide = openslide.OpenSlide(self.slide_path)
        x, y = (int(v) for v in self.coords[i])
        img = self.slide.read_region((x, y), 0, (self.level0_size, self.level0_size)).convert("RGB")
        if img.size != (self.tile_size, self.tile_size):
            img = img.resize((self.tile_size, self.tile_size), Image.BICUBIC)
        return self.transform(img), self.coords[i]


def _timm_extract(model, slides: list[Path], out_dir: Path, tile_size: int, batch_size: int, workers: int) -> int:
    import h5py
    import torch

    from gpfm_jax.data.slides import tile_coordinates

    total = 0
    for slide in slides:
        grid = tile_coordinates(slide, tile_size, 20.0)
        ds = _TileDataset(str(slide), grid.coords, grid.level0_size, tile_size)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=False)
        with h5py.File(out_dir / f"{slide.stem}.h5", "w") as f:
            feats = f.create_dataset("features", (0, model.num_features), maxshape=(None, model.num_features),
                                     dtype="float32")
            cds = f.create_dataset("coords", (0, 2), maxshape=(None, 2), dtype="int64")
            with torch.inference_mode():
                for x, c in loader:
                    out = model(x).numpy()
                    n = len(out)
                    feats.resize(feats.shape[0] + n, axis=0)
                    feats[-n:] = out
                    cds.resize(cds.shape[0] + n, axis=0)
                    cds[-n:] = c.numpy()
                    total += n
    return total


def _jax_extract(encoder, slides: list[Path], out_dir: Path, tile_size: int, workers: int) -> int:
    from gpfm_jax.extract import runner

    report = runner.extract_slides(encoder, slides, out_dir, runner.SlideOptions(tile_size=tile_size),
                                   runner.LoaderOptions(workers=workers, progress=False))
    if report.failed:
        raise SystemExit(f"extraction failed: {report.failed}")
    return report.num_tiles


VIT_ARCHS = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}  # embed_dim, depth, heads


def _random_bundle(arch: str, workdir: Path) -> Path:
    """A gpfm_jax ViT/14 bundle at 224 with random weights (LayerScale 1: every block matters)."""
    import flax.linen as nn
    import jax

    from gpfm_jax.convert.bundle import preprocessing, save_bundle
    from gpfm_jax.models.vit import ViTConfig, VisionTransformer

    dim, depth, heads = VIT_ARCHS[arch]
    cfg = ViTConfig(img_size=224, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads, layerscale_init=None)
    shapes = jax.eval_shape(VisionTransformer(cfg).init, jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32),
                          nn.meta.unbox(shapes)["params"])
    out = workdir / f"vit_{arch}"
    save_bundle(out, params, {"encoder": "vit", "vit": cfg.to_dict(), "outputs": {"cls": dim},
                              "preprocessing": preprocessing(224), "provenance": {"source": "random"}})
    return out


def _per_tile_ms(fn, items, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - t) / len(items))
    return 1e3 * best


def _host_costs(slide: Path, work: Path, n: int = 48) -> dict[str, float]:
    """ms per tile of each host-side step, one thread."""
    import io

    from PIL import Image

    from gpfm_jax.data.sources import decode_image
    from gpfm_jax.extract.preprocess import resize_tile
    from gpfm_jax.extract.slide_io import SlideReader, TilingOptions, plan_slide

    plan = plan_slide(slide, TilingOptions(tile_size=256))
    with SlideReader(plan) as reader:
        idx = list(range(min(n, len(plan.coords))))
        tiles = [reader(i) for i in idx]
        slide_ms = _per_tile_ms(reader, idx)
    files = []
    for i, t in enumerate(tiles):
        buf = io.BytesIO()
        Image.fromarray(t).save(buf, format="JPEG", quality=90)
        files.append(work / f"tile{i}.jpg")
        files[-1].write_bytes(buf.getvalue())
    blobs = [f.read_bytes() for f in files]
    return {"slide read+decode": slide_ms,
            "file read": _per_tile_ms(lambda f: f.read_bytes(), files),
            "jpeg decode": _per_tile_ms(lambda b: decode_image(b, "tile"), blobs),
            "resize 256->224": _per_tile_ms(lambda t: resize_tile(t, 224, "bicubic"), tiles)}


def _read_slide_tiles(slide: str, copies: int = 4) -> int:
    """Reads and resizes every tile of `slide` `copies` times (one reader handle); returns the tile count. The
    tissue grid comes from a cache filled by the warm-up pass, so only reading and resizing are timed."""
    from gpfm_jax.extract.preprocess import resize_tile
    from gpfm_jax.extract.slide_io import SlideReader, TilingOptions, plan_slide

    plan = plan_slide(slide, TilingOptions(tile_size=256, cache_dir=str(Path(slide).parent / "grids")))
    with SlideReader(plan) as reader:
        for _ in range(copies):
            for i in range(len(plan.coords)):
                resize_tile(reader(i), 224, "bicubic")
    return copies * len(plan.coords)


def _reader_scaling(slides: list[Path], workers: list[int]) -> dict[str, float]:
    """tiles/s of read+resize with n threads vs n processes (spawned), one slide per task: if processes scale and
    threads do not, the GIL limits the readers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    out = {}
    for n in workers:
        for kind, pool in (("threads", lambda n: ThreadPoolExecutor(n)),
                           ("processes", lambda n: ProcessPoolExecutor(n, multiprocessing.get_context("spawn")))):
            with pool(n) as p:
                list(p.map(_read_slide_tiles, map(str, slides)))  # warm (imports, page cache, tissue grids)
                t = time.perf_counter()
                tiles = sum(p.map(_read_slide_tiles, map(str, slides)))
                out[f"{n} {kind}"] = tiles / (time.perf_counter() - t)
    return out


def _device_costs(encoder, repeats: int = 3) -> dict[str, float]:
    """ms per tile of the transfer (host -> device shards) and of the forward on device-resident tiles."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gpfm_jax.extract.encoder import DATA_AXIS

    split = NamedSharding(encoder.mesh, P(DATA_AXIS))
    host = np.random.default_rng(0).integers(0, 256, (encoder.batch_size, 224, 224, 3), np.uint8)
    on_device = jax.device_put(host, split)
    encoder.dispatch(host).block_until_ready()  # compile
    transfer = _per_tile_ms(lambda _: jax.device_put(host, split).block_until_ready(), [0] * 4, repeats)
    forward = _per_tile_ms(lambda _: encoder._forward(on_device).block_until_ready(), [0], repeats)
    return {"transfer": transfer / encoder.batch_size, "forward": forward / encoder.batch_size}


def scaling(args) -> None:
    import jax

    from gpfm_jax.extract import runner
    from gpfm_jax.extract.encoder import load_feature_encoder

    counts = [int(c) for c in args.devices.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        slides = _slide_copies(work, args.copies)
        bundle = _random_bundle(args.arch, work)
        host = _host_costs(slides[0], work)
        print(f"jax {jax.__version__}, {len(jax.local_devices())} {jax.local_devices()[0].platform} devices, "
              f"{os.cpu_count()} CPUs; ViT-{args.arch[0].upper()}/14 at 224 (random), {args.batch_per_device} tiles "
              f"per device per batch; {args.copies} x cmu_small_region.svs, 256 px tiles at 20x")
        print("host, ms per tile (one thread): " + ", ".join(f"{k} {v:.2f}" for k, v in host.items()))
        readers = _reader_scaling(slides, sorted({1, min(2, os.cpu_count() or 1), os.cpu_count() or 1}))
        print("read+resize tiles/s: " + ", ".join(f"{k} {v:.0f}" for k, v in readers.items()), flush=True)
        print(f"{'devices':>7} {'readers':>7} {'batch':>5} {'tiles/s':>8} {'transfer ms/tile':>16} "
              f"{'forward ms/tile':>15}  waited")
        for n in counts:
            encoder = load_feature_encoder(bundle, batch_size=args.batch_per_device * n, devices=n)
            dev = _device_costs(encoder)
            loader = runner.LoaderOptions(workers=args.workers, progress=False)
            out = work / f"out{n}"
            runner.extract_slides(encoder, slides[:1], out / "warm", runner.SlideOptions(tile_size=256), loader)
            rates, paces = [], []
            for r in range(args.repeats):
                rep = runner.extract_slides(encoder, slides, out / str(r), runner.SlideOptions(tile_size=256), loader)
                rates.append(rep.num_tiles / rep.seconds)
                paces.append(rep.pace)
            print(f"{n:>7} {loader.threads(encoder):>7} {encoder.batch_size:>5} {statistics.median(rates):>8.1f} "
                  f"{dev['transfer']:>16.3f} {dev['forward']:>15.2f}  {paces[-1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None, help="comma-separated device counts: the scaling study")
    parser.add_argument("--batch-per-device", type=int, default=8)
    parser.add_argument("--arch", choices=sorted(TIMM_ARCHS), default="small")
    parser.add_argument("--copies", type=int, default=8, help="copies of the sample slide per pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tile-size", type=int, default=256, help="pixels at 20x (resized to 224 on both sides)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (timm) = reader threads (JAX); default min(2, CPUs), and in the "
                             "--devices study gpfm-extract's own default")
    args = parser.parse_args()
    if args.devices:
        most = max(int(c) for c in args.devices.split(","))
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={most}").strip()
        return scaling(args)
    args.workers = args.workers or min(2, os.cpu_count() or 1)

    import h5py
    import jax
    import torch

    from gpfm_jax.extract.encoder import load_feature_encoder

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        slides = _slide_copies(work, args.copies)
        model = _timm_model(args.arch)
        start = time.perf_counter()
        encoder = load_feature_encoder(_bundle(model, work), batch_size=args.batch_size)
        encoder(np.zeros((1, 224, 224, 3), np.uint8))  # compile
        compile_s = time.perf_counter() - start
        print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; {TIMM_ARCHS[args.arch]} at 224, "
              f"batch {args.batch_size}, {args.workers} readers; {args.copies} x cmu_small_region.svs, "
              f"{args.tile_size} px tiles at 20x; JAX load+compile {compile_s:.1f} s (not timed below)")

        def run(side: str, tag: str) -> tuple[float, int]:
            out = work / f"{side}_{tag}"
            out.mkdir()
            t = time.perf_counter()
            if side == "jax":
                n = _jax_extract(encoder, slides, out, args.tile_size, args.workers)
            else:
                n = _timm_extract(model, slides, out, args.tile_size, args.batch_size, args.workers)
            return time.perf_counter() - t, n

        run("jax", "warm"), run("timm", "warm")
        with h5py.File(work / "jax_warm" / "slide0.h5") as a, h5py.File(work / "timm_warm" / "slide0.h5") as b:
            assert np.array_equal(a["coords"][()], b["coords"][()]), "the two sides tiled differently"
            diff = np.abs(a["features"][()] - b["features"][()]).max()
            scale = np.abs(b["features"][()]).max()
        times = {"jax": [], "timm": []}
        tiles = 0
        for r in range(args.repeats):
            for side in ("jax", "timm"):
                s, tiles = run(side, str(r))
                times[side].append(s)
        rate = {k: tiles / statistics.median(v) for k, v in times.items()}
        print(f"{tiles} tiles per pass; features jax vs timm: max abs diff {diff:.2e} (max |feature| {scale:.2f})")
        for k in ("jax", "timm"):
            print(f"  {k:<5} {rate[k]:7.2f} tiles/s  (passes: {', '.join(f'{t:.2f}s' for t in times[k])})")
        print(f"  jax / timm = {rate['jax'] / rate['timm']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
