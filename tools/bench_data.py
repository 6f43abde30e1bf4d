"""Benchmark: DINOv2 multi-crop samples/s per CPU core, gpfm_jax.data (numpy + PIL) vs torchvision (DINOv2's recipe).

Both run in this process on one core (BLAS / torch threads pinned to 1), on the same 512x512 JPEG tiles, each sample
= read file + decode + 2 global + 8 local crops with colour ops + normalisation. Rounds alternate between the two so
that load from other processes hits both alike; medians and the median per-round ratio are reported.

    python tools/bench_data.py [--tiles DIR] [--samples 40] [--rounds 5] [--pipeline]

--pipeline adds where the time of one sample goes (each stage timed alone) and the full pipeline's samples/s with
every thread and worker process on the same single core (spawned workers inherit the affinity), next to the bare
augmentation in the same rounds: samples/s per core of the whole host-side data path.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpfm_jax.data.augment import MultiCropConfig, multi_crop  # noqa: E402
from gpfm_jax.data.batch import GLOBAL_CROPS, LOCAL_CROPS  # noqa: E402
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
        return {GLOBAL_CROPS: [g1(geo_g(img)), g2(geo_g(img))],
                LOCAL_CROPS: [loc(geo_l(img)) for _ in range(cfg.num_local_crops)]}

    return sample


def ours(cfg: MultiCropConfig, dtype: str = "float32"):
    def sample(path: Path, _i=[0]):
        _i[0] += 1
        return multi_crop(read_image_file(str(path)), np.random.default_rng([0, _i[0]]), cfg, dtype)

    return sample


def rate(fn, paths: list[Path], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(paths[i % len(paths)])
    return n / (time.perf_counter() - t0)


def stage_ms(paths: list[Path], cfg: MultiCropConfig, n: int, batch: int = 16) -> dict[str, float]:
    """Where one sample's time goes (ms per sample, one core): each stage timed on its own, in a loop."""
    from gpfm_jax.data import augment as A
    from gpfm_jax.data.masking import MaskingConfig, batch_masks
    from gpfm_jax.data.pipeline import CollateSampleMajor

    images = [read_image_file(str(p)) for p in paths]
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}

    def timed(name, fn, reps):
        t0 = time.process_time()
        for i in range(reps):
            fn(i)
        out[name] = round((time.process_time() - t0) / reps * 1e3, 2)

    timed("read + decode (512 px JPEG)", lambda i: read_image_file(str(paths[i % len(paths)])), n)
    plans = []

    def crops(i):
        img = Image.fromarray(images[i % len(images)])
        g = A.apply_crop_plan(img, A.draw_crop_plan(rng, 512, 512, 2, cfg.global_scale, cfg), cfg.global_size)
        loc = A.apply_crop_plan(img, A.draw_crop_plan(rng, 512, 512, cfg.num_local_crops, cfg.local_scale, cfg),
                                cfg.local_size)
        gp = A.draw_color_plan(rng, np.array([cfg.blur_p_global1, cfg.blur_p_global2]),
                               np.array([0.0, cfg.solarize_p_global2]), cfg)
        lp = A.draw_color_plan(rng, np.full(cfg.num_local_crops, cfg.blur_p_local), np.zeros(cfg.num_local_crops), cfg)
        plans.append((g, gp, loc, lp))

    timed("crop + resize + flips (PIL bicubic, 10 crops)", crops, n)
    timed("colour ops -> uint8", lambda i: [A.apply_color_plan_uint8(c, p, cfg) for c, p in
                                           (plans[i][:2], plans[i][2:])], n)
    timed("colour ops -> normalised float32", lambda i: [A.apply_color_plan(c, p, cfg) for c, p in
                                                        (plans[i][:2], plans[i][2:])], n)
    for dtype in ("uint8", "float32"):
        recs = [dict(multi_crop(images[i % len(images)], np.random.default_rng(i), cfg, dtype), num_skipped=0)
                for i in range(batch)]
        timed(f"collate ({dtype}, per sample)", lambda i: CollateSampleMajor()(recs), 20)
        out[f"collate ({dtype}, per sample)"] = round(out[f"collate ({dtype}, per sample)"] / batch, 3)
    mcfg = MaskingConfig()
    timed("iBOT masks (per sample)", lambda i: batch_masks(2 * batch, np.random.default_rng(i), mcfg), 20)
    out["iBOT masks (per sample)"] = round(out["iBOT masks (per sample)"] / batch, 3)
    return out


def pipeline_run(tile_dir: str, dtype: str, workers: int, threads: int, n_batches: int, tune: bool,
                 batch: int = 16) -> dict:
    """One finite run in this (fresh) process, drained: wall time and the CPU seconds of this process and of its
    worker processes (reaped). workers < 0: the bare augmentation loop instead (n_batches * batch samples);
    tune: glibc malloc settings (`pipeline.tune_malloc`) in the process(es) that augment."""
    import multiprocessing
    import resource

    from gpfm_jax.data.pipeline import PipelineConfig, make_iterator, tune_malloc

    t0 = time.perf_counter()
    if workers < 0:
        if tune:
            tune_malloc()
        paths = sorted(Path(tile_dir).glob("*.jpg"))
        fn = ours(MultiCropConfig(), dtype)
        for i in range(n_batches * batch):
            fn(paths[i % len(paths)])
    else:
        if tune and workers == 0:
            tune_malloc()
        src = FolderSource(tile_dir)
        # exactly n_batches: the repeated source cut to n_batches * batch records (drop_remainder batching)
        cfg = PipelineConfig(global_batch_size=batch, read_threads=threads, prefetch_records=2, worker_count=workers,
                             worker_buffer_size=2, crop_dtype=dtype, shuffle=False)
        it = make_iterator(src, cfg, num_epochs=-(-n_batches * batch // len(src)), tune_worker_malloc=tune)
        for _ in range(n_batches):
            next(it)
        del it
    wall = time.perf_counter() - t0
    for p in multiprocessing.active_children():
        p.join()
    cpu = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        cpu += r.ru_utime + r.ru_stime
    return {"wall_s": wall, "cpu_s": cpu}


def _pipeline_child(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "_pipeline", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def pipeline_cpu_per_sample(tile_dir: Path, dtype: str, workers: int, threads: int, n_batches: int, tune: bool,
                            batch: int = 16) -> tuple[float, float]:
    """(samples per CPU-second, samples/s wall): two runs of 2 and 2 + n_batches batches in fresh processes; their
    difference cancels start-up (imports, spawning workers, warm-up) and what the workers had prefetched, leaving
    the CPU seconds of every process per extra sample."""
    short = _pipeline_child(tile_dir, dtype, workers, threads, 2, int(tune), batch)
    long = _pipeline_child(tile_dir, dtype, workers, threads, 2 + n_batches, int(tune), batch)
    samples = n_batches * batch
    return samples / (long["cpu_s"] - short["cpu_s"]), samples / (long["wall_s"] - short["wall_s"])


# (name, worker processes (-1: the bare augmentation loop), read threads, crop dtype, malloc tuning)
PIPELINE_VARIANTS = (
    ("augmentation alone, uint8", -1, 0, "uint8", False),
    ("augmentation alone, uint8, tuned malloc", -1, 0, "uint8", True),
    ("in-process, 1 read thread, uint8", 0, 1, "uint8", False),
    ("in-process, 1 read thread, float32", 0, 1, "float32", False),
    ("2 grain workers, uint8, default malloc", 2, 1, "uint8", False),
    ("2 grain workers, uint8 (the default)", 2, 1, "uint8", True),
    ("2 grain workers, float32", 2, 1, "float32", True),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=Path, help="folder of tiles (default: 16 JPEGs cut from tests/data)")
    ap.add_argument("--samples", type=int, default=40, help="samples per round per pipeline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pipeline", action="store_true",
                    help="also: per-stage times, and the full grain pipeline (threads; 2 worker processes)")
    ap.add_argument("--pipeline-batches", type=int, default=24,
                    help="--pipeline: batches of 16 timed per run (start-up CPU must be small next to them)")
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
            print("\nwhere the time goes (ms of one core per sample, each stage alone):")
            for name, ms in stage_ms(paths, cfg, max(args.samples // 2, 8)).items():
                print(f"  {name:48s} {ms:8.3f}")
            print(f"\nfull pipeline, batch 16, every thread and process on this one core, {args.rounds} rounds; "
                  "samples per CPU-second of all its processes (= samples/s of one dedicated core), wall samples/s "
                  "in brackets:")
            rates: dict[str, list[tuple[float, float]]] = {v[0]: [] for v in PIPELINE_VARIANTS}
            for _ in range(args.rounds):
                for name, workers, threads, dtype, tune in PIPELINE_VARIANTS:
                    rates[name].append(pipeline_cpu_per_sample(tile_dir, dtype, workers, threads,
                                                               args.pipeline_batches, tune))
            for name, r in rates.items():
                cpu, wall = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
                print(f"  {name:42s} {cpu:7.1f} samples/s/core ({wall:5.1f})   rounds "
                      f"{[round(x[0], 1) for x in r]}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_pipeline":
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        a = sys.argv[2:]
        print(json.dumps(pipeline_run(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), bool(int(a[5])), int(a[6]))))
    else:
        main()
