"""Benchmark: the gpfm-index tile index at the recipe's scale, and random slide reads through the handle LRU.

Tiles (--sizes): for each size, a synthetic index in the official JSON format {slide_dir: [file, ...]} is written to
a temporary folder (realistic name lengths, ~2,640 tiles per slide: 72k slide folders at 190M). Every slide folder is
a symlink to one folder of real 512x512 JPEGs cut from tests/data (hard links to 16 tiles under 5,000 names), so
records are real image bytes. Measured, each in a fresh process: `gpfm-index build` time and peak RSS; open time;
path lookups/s and records/s (read + decode) at random indices; RSS of the trainer process and of each of 2 grain
workers after a few batches, next to the same pipeline over a 1k-tile index; bytes per tile on disk. At 1M the
JSON source (IndexSource) is measured too, as the "before".

Slides (--slides N): N copies (symlinks, different names) of the bundled CC0 slide in one slides index (its tile grid
repeated: tiling is not what is measured), random tiles read in one thread with the handle LRU at --handles,
against an LRU as large as N (every slide stays open) with one shared 64 MiB tile cache or openslide's own cache per
slide (what one handle per slide meant before); tiles/s per core, peak open file descriptors, peak RSS.

    python tools/bench_index.py --sizes 1M,20M [--tmp DIR] [--keep]
    python tools/bench_index.py --sizes 190M --tmp /big/tmp
    python tools/bench_index.py --slides 1000 --handles 64

Packed (--packed 20M,190M): a synthetic packed folder of N one-pixel PNG records (69 bytes: the reader's memory,
not the image size, is what is measured) in shards of 16,384 records, then in fresh processes: open time, random
reads/s, and the RSS of the trainer and of 2 grain workers after a few batches, next to a 1k-record pack. Always (with
--packed): records/s (read + decode, one thread) from the 1k real 512x512 JPEGs as files, as local shards and as
shards in the GCS emulator (tests/emulators.py; needs the test extra), and bytes-only reads/s.

    python tools/bench_index.py --packed 20M,190M --tmp /big/tmp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]
TILES_PER_SLIDE = 2640  # 190M / 72k
NAMES = [f"x{(k % 80) * 512:06d}_y{(k // 80) * 512:06d}_20x.jpg" for k in range(5000)]  # 23 characters


def _mb(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _status(pid: int) -> dict[str, float]:
    """VmRSS / RssAnon / RssFile of a process in MiB, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


def make_real_tiles(folder: Path) -> Path:
    """5,000 names, hard links to 16 real 512x512 JPEGs (quality 90) cut from the repo's H&E image."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    src = Image.open(REPO / "tests/data/tiatoolbox_target_image.png").convert("RGB")
    rng = np.random.default_rng(0)
    originals = []
    for i in range(16):
        x, y = (int(v) for v in rng.integers(0, 1000 - 512, 2))
        p = folder / f"_orig_{i:02d}.jpg"
        src.crop((x, y, x + 512, y + 512)).save(p, quality=90)
        originals.append(p)
    for k, name in enumerate(NAMES):
        os.link(originals[k % 16], folder / name)
    return folder


def make_json(out: Path, n_tiles: int, real: Path) -> Path:
    """The official format, written as a stream; slide folders are symlinks to `real`."""
    n_slides = max(1, round(n_tiles / TILES_PER_SLIDE))
    rng = np.random.default_rng(n_tiles)
    counts = rng.integers(TILES_PER_SLIDE // 4, TILES_PER_SLIDE * 7 // 4, n_slides)
    counts = np.floor(counts * (n_tiles / counts.sum())).astype(np.int64)
    counts[: n_tiles - counts.sum()] += 1  # the remainder, one each (fewer than n_slides)
    assert counts.sum() == n_tiles and counts.max() <= len(NAMES)
    slides_dir = out / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    index = out / "index.json"
    with open(index, "w", buffering=1 << 24) as f:
        f.write("{")
        for s, c in enumerate(counts):
            name = f"TCGA-{s % 100:02d}-{s:06d}-01Z-00-DX1.{s * 2654435761 % 16**12:012X}"  # 40 characters
            os.symlink(real, slides_dir / name)
            start = int(rng.integers(0, len(NAMES) - c + 1))
            f.write(("," if s else "") + f'"slides/{name}":["' + '","'.join(NAMES[start:start + c]) + '"]')
        f.write("}")
    return index


def _child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def child_build(json_file: str, out: str) -> dict:
    from gpfm_jax.data.index import build_from_json

    t0, c0 = time.perf_counter(), time.process_time()
    build_from_json(json_file, out)
    return {"build_s": round(time.perf_counter() - t0, 1), "build_cpu_s": round(time.process_time() - c0, 1),
            "build_peak_rss_mb": _peak_rss_mb()}


def child_open(index: str, kind: str) -> dict:
    """Open time, then random path lookups/s and full records/s (read + decode)."""
    from gpfm_jax.data.index import TileIndexSource
    from gpfm_jax.data.sources import IndexSource

    t0 = time.perf_counter()
    src = TileIndexSource(index) if kind == "index" else IndexSource(index, max_bytes=None)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    src.path(len(src) - 1)
    first_s = time.perf_counter() - t0
    idx = np.random.default_rng(0).integers(0, len(src), 20000)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in idx:
        src.path(int(i))
    lookups, lookups_cpu = len(idx) / (time.perf_counter() - t0), len(idx) / (time.process_time() - c0)
    for i in idx[-20:]:  # warm-up: the first records of a process cost more (library and file-system caches)
        src[int(i)]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in idx[:300]:
        src[int(i)]
    records, records_cpu = 300 / (time.perf_counter() - t0), 300 / (time.process_time() - c0)
    # per CPU-second figures are what one core sustains; wall figures also carry this machine's other load
    return {"open_ms": round(open_s * 1e3, 2), "first_lookup_ms": round(first_s * 1e3, 2),
            "lookups_per_s": round(lookups),
            "lookups_per_cpu_s": round(lookups_cpu), "records_per_s": round(records, 1),
            "records_per_cpu_s": round(records_cpu, 1), "open_peak_rss_mb": _peak_rss_mb(), "tiles": len(src)}


def child_pipeline(index: str, kind: str) -> dict:
    """RSS of this (trainer) process and of each of 2 grain workers after 12 batches."""
    import dataclasses
    import multiprocessing

    from gpfm_jax.data import MaskingConfig, MultiCropConfig, PipelineConfig, make_iterator
    from gpfm_jax.data.index import TileIndexSource
    from gpfm_jax.data.sources import IndexSource

    if kind == "packed":
        from gpfm_jax.data.index import PackedSource

        src = PackedSource(index)
    else:
        src = TileIndexSource(index) if kind == "index" else IndexSource(index, max_bytes=None)
    cfg = PipelineConfig(global_batch_size=8, worker_count=2, worker_buffer_size=1, read_threads=1,
                         multicrop=MultiCropConfig(global_size=112, local_size=56, num_local_crops=4),
                         masking=MaskingConfig(grid=(8, 8)))
    cfg = dataclasses.replace(cfg, prefetch_records=2)
    it = make_iterator(src, cfg)
    t0 = time.perf_counter()
    next(it)
    first_s = time.perf_counter() - t0
    for _ in range(11):
        next(it)
    workers = [p.pid for p in multiprocessing.active_children()]  # grain's worker processes
    # RSS, and its private (anonymous) part; the rest is file-backed and shared: libraries, page cache
    mem = [_status(pid) for pid in [os.getpid(), *workers]]
    out = {"trainer_rss_mb": mem[0]["VmRSS"], "trainer_anon_mb": mem[0]["RssAnon"],
           "worker_rss_mb": [m["VmRSS"] for m in mem[1:]], "worker_anon_mb": [m["RssAnon"] for m in mem[1:]],
           "first_batch_s": round(first_s, 1)}
    it.close() if hasattr(it, "close") else None
    return out


def bench_size(n: int, tmp: Path, real: Path, small: Path) -> dict:
    label = f"{n / 1e6:g}M"
    d = tmp / label
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    js = make_json(d, n, real)
    gen_s = time.perf_counter() - t0
    row = {"tiles": n, "json_gb": round(js.stat().st_size / 1e9, 2), "generate_s": round(gen_s, 1)}
    print(f"[{label}] JSON written: {row}", flush=True)
    row |= _child("_build", str(js), str(d / "index"))
    m = json.loads((d / "index" / "manifest.json").read_text())
    names = sum(a["bytes"] for k, a in m["arrays"].items() if k.endswith(".bin"))
    fixed = sum(a["bytes"] for a in m["arrays"].values()) - names
    row |= {"slides": m["num_slides"], "bytes_per_tile": round(fixed / n, 3), "name_blob_gb": round(names / 1e9, 2)}
    print(f"[{label}] built: {row}", flush=True)
    row["open"] = _child("_open", str(d / "index"), "index")
    print(f"[{label}] open: {row['open']}", flush=True)
    row["pipeline"] = _child("_pipeline", str(d / "index"), "index")
    row["pipeline_1k"] = _child("_pipeline", str(small), "index")
    print(f"[{label}] pipeline: {row['pipeline']} vs 1k: {row['pipeline_1k']}", flush=True)
    if n <= 2_000_000:  # the JSON source, as before this index
        row["json_source_open"] = _child("_open", str(js), "json")
        row["json_source_pipeline"] = _child("_pipeline", str(js), "json")
        print(f"[{label}] JSON source: {row['json_source_open']} {row['json_source_pipeline']}", flush=True)
    return row


def bench_slides(n: int, handles: int, tmp: Path) -> dict:
    """Random reads over n slide copies, LRU at `handles` vs one handle per slide."""
    from gpfm_jax.data import slides as slides_lib
    from gpfm_jax.data.index.store import IndexWriter
    from gpfm_jax.data.testing import SLIDE

    folder = tmp / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"copy_{i:05d}.svs"
        if not p.exists():
            os.symlink(SLIDE, p)
        paths.append(str(p))
    grid = slides_lib.tile_coordinates(SLIDE, 224, 20)
    with IndexWriter(tmp / "slide_index", "slides", overwrite=True) as w:
        names, offs = w.blob("slide_names.bin"), [0]
        for p in paths:
            names.write(os.fsencode(p))
            offs.append(names.offset)
        w.array("slide_name_offsets", offs, "<u8")
        w.array("coords", np.tile(grid.coords, (n, 1)).astype(np.int32), "<i4")
        w.array("tile_starts", np.arange(n + 1) * len(grid.coords), "<i8")
        w.array("level0_size", [grid.level0_size] * n, "<i8")
        w.array("num_levels", [len(grid.info.level_downsamples)] * n, "<i4")
        w.array("level_downsamples", [list(grid.info.level_downsamples)] * n, "<f8")
        w.commit({"num_tiles": n * len(grid.coords), "num_slides": n}, {"from": "bench_index"}, {"tile_size": 224})
    out = {}
    variants = (("lru", handles, 64.0), ("every_slide_open_shared_cache", n, 64.0),
                ("every_slide_open_own_caches", n, 0.0))  # 0: openslide's default, 32 MiB per handle
    for label, h, cache in variants:
        out[label] = _child("_slides", str(tmp / "slide_index"), str(h), str(cache))
        print(f"[slides x{n}] {label} (handles {h}): {out[label]}", flush=True)
    return out


def child_slides(index: str, handles: str, cache_mb: str) -> dict:
    from gpfm_jax.data.index import SlideIndexSource

    src = SlideIndexSource(index, handles=int(handles), cache_mb=float(cache_mb))
    idx = np.random.default_rng(0).integers(0, len(src), 4000)
    fd0 = len(os.listdir("/proc/self/fd"))
    peak = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for k, i in enumerate(idx):
        src[int(i)]
        if k % 10 == 0:
            peak = max(peak, len(os.listdir("/proc/self/fd")))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tiles_per_s": round(len(idx) / wall, 1), "tiles_per_cpu_s": round(len(idx) / cpu, 1),
            "peak_fds": peak, "fds_before": fd0, "open_handles": len(src.handles), "opened": src.handles.opened,
            "peak_rss_mb": _peak_rss_mb()}


# PIL's Image.new("RGB", (1, 1), (200, 100, 150)) as PNG
PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c49444154789c6338"
                        "91320d0003ba01c3b58cca860000000049454e44ae426082")


PACK_RATE_TILES = 20_000  # real 512x512 JPEGs packed to measure the packing rate


def make_packed(out: Path, n: int, per_shard: int = 16384) -> dict:
    """A packed folder of n identical one-pixel PNG records (the layout of gpfm-index pack; no hashes, no index
    copy: only the reader is measured)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from gpfm_jax.data.index import pack, packed

    out.mkdir(parents=True, exist_ok=True)
    shards, t0 = [], time.perf_counter()
    for k, start in enumerate(range(0, n, per_shard)):
        name, count = pack.SHARD_NAME.format(k), min(per_shard, n - start)
        if not (out / name).exists():
            w = ArrayRecordWriter(str(out / f"{name}.tmp"), pack.WRITER_OPTIONS)
            for _ in range(count):
                w.write(PNG_1PX)
            w.close()
            os.replace(out / f"{name}.tmp", out / name)
        shards.append({"file": name, "records": count, "bytes": (out / name).stat().st_size, "sha256": ""})
    (out / packed.MANIFEST).write_text(json.dumps({
        "format": packed.FORMAT, "version": packed.VERSION, "num_records": n, "encoding": "png", "empty_records": 0,
        "source": {"kind": "synthetic"}, "build": {}, "shards": shards}))
    return {"records": n, "shards": len(shards), "gb": round(sum(s["bytes"] for s in shards) / 1e9, 2),
            "write_s": round(time.perf_counter() - t0, 1)}


def child_packed_open(folder: str, index_storage: str = "auto", reads: str = "20000") -> dict:
    """Open time, the first read, random reads/s (bytes only) and this process's RSS after `reads` reads."""
    from gpfm_jax.data.index import PackedSource

    rss0 = _status(os.getpid())["VmRSS"]
    t0 = time.perf_counter()
    src = PackedSource(folder, index_storage=index_storage)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    src.read_bytes(len(src) - 1)
    first_s = time.perf_counter() - t0
    idx = np.random.default_rng(0).integers(0, len(src), int(reads))
    t0, c0 = time.perf_counter(), time.process_time()
    for i in idx:
        src.read_bytes(int(i))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"open_ms": round(open_s * 1e3, 2), "first_read_ms": round(first_s * 1e3, 2),
            "reads_per_s": round(len(idx) / wall), "reads_per_cpu_s": round(len(idx) / cpu),
            "index_storage": src.index_storage, "open_readers": src.num_open(), "rss_before_mb": rss0,
            "rss_after_mb": _status(os.getpid())["VmRSS"]}


def child_read_rates(files_index: str, local: str, url: str) -> dict:
    """records/s (read + decode) and bytes-only reads/s, one thread, the same random tiles from each."""
    from gpfm_jax.data.index import PackedSource, TileIndexSource

    files = TileIndexSource(files_index)
    sources = {"files": files, "local_shards": PackedSource(local)}
    if url:
        sources["gcs_emulator_shards"] = PackedSource(url)
    idx = [int(i) for i in np.random.default_rng(1).integers(0, len(files), 300)]
    out = {}
    for name, src in sources.items():
        read = (lambda i: open(files.path(i), "rb").read()) if name == "files" else src.read_bytes
        for i in idx[:20]:
            src[i]  # warm-up: readers opened, caches filled
        t0 = time.perf_counter()
        for i in idx:
            read(i)
        t1 = time.perf_counter()
        for i in idx:
            src[i]
        t2 = time.perf_counter()
        out[name] = {"bytes_reads_per_s": round(len(idx) / (t1 - t0)), "records_per_s": round(len(idx) / (t2 - t1), 1)}
    return out


def bench_packed(sizes: list[int], tmp: Path, small_index: Path) -> dict:
    from gpfm_jax import storage
    from gpfm_jax.data.index import TileIndexSource, pack

    out: dict = {}
    real_index = tmp / "pack_rate" / "index"
    _child("_build", str(make_json(tmp / "pack_rate", PACK_RATE_TILES, tmp / "real_tiles")), str(real_index))
    files = TileIndexSource(real_index)
    tile_bytes = sum(os.path.getsize(files.path(i)) for i in range(len(files)))
    t0 = time.perf_counter()
    rate_pack = Path(pack.pack(real_index, tmp / "pack_rate" / "packed", workers=8))
    wall = time.perf_counter() - t0
    m = json.loads((rate_pack / "manifest.json").read_text())
    mb = sum(s["bytes"] for s in m["shards"]) / 1e6
    out["pack_rate"] = {"tiles": PACK_RATE_TILES, "s": round(wall, 1), "tiles_per_s": round(PACK_RATE_TILES / wall),
                        "mb_per_s": round(mb / wall, 1), "shards": len(m["shards"]), "mb": round(mb, 1),
                        "overhead_bytes_per_record": round((mb * 1e6 - tile_bytes) / PACK_RATE_TILES, 1)}
    print(f"[packed] pack rate: {out['pack_rate']}", flush=True)
    shutil.rmtree(tmp / "pack_rate", ignore_errors=True)
    packed_1k = Path(pack.pack(small_index, tmp / "packed_1k_real"))
    url = ""
    try:
        sys.path.insert(0, str(REPO / "tests"))
        from emulators import GCS

        gcs = GCS(tmp / "gcs").start()
        url = pack.pack(small_index, gcs.bucket("bench") + "/packed_1k")
        synth = tmp / "synth_4_shards"
        make_packed(synth, 4 * 16384)
        storage.copy_tree(synth, f"{gcs.bucket('bench')}/synth")
        for mode in ("in_memory", "offloaded"):  # full 16,384-record shards: the per-read footer cost
            out[f"gcs_emulator_4x16384_tiny_{mode}"] = _child("_packed_open", "gs://bench/synth", mode, "300")
            out[f"local_4x16384_tiny_{mode}"] = _child("_packed_open", str(synth), mode, "3000")
        print("[packed] 4 x 16384 tiny records: " + ", ".join(f"{k}: {v['reads_per_s']}/s" for k, v in out.items()
                                                               if k.endswith(("in_memory", "offloaded"))), flush=True)
    except Exception as e:  # noqa: BLE001 - the emulator is optional here; say so in the results
        out["gcs_emulator"] = f"not measured: {type(e).__name__}: {e}"
        gcs = None
    try:
        out["read_rates_1k_real_tiles"] = _child("_rates", str(small_index), str(packed_1k), url)
        print(f"[packed] read rates: {out['read_rates_1k_real_tiles']}", flush=True)
    finally:
        if gcs is not None:
            gcs.stop()
    synth_1k = tmp / "packed_1k_synthetic"
    make_packed(synth_1k, 1000)
    out["pipeline_1k"] = _child("_pipeline", str(synth_1k), "packed")
    print(f"[packed 1k] pipeline: {out['pipeline_1k']}", flush=True)
    for n in sizes:
        label = f"{n / 1e6:g}M"
        row = {"made": make_packed(tmp / f"packed_{label}", n)}
        print(f"[packed {label}] written: {row['made']}", flush=True)
        row["open"] = _child("_packed_open", str(tmp / f"packed_{label}"))
        print(f"[packed {label}] open: {row['open']}", flush=True)
        if n <= 20_000_000:  # what the default in-memory index would cost
            row["open_in_memory_index"] = _child("_packed_open", str(tmp / f"packed_{label}"), "in_memory")
            print(f"[packed {label}] open, in-memory index: {row['open_in_memory_index']}", flush=True)
        row["pipeline"] = _child("_pipeline", str(tmp / f"packed_{label}"), "packed")
        print(f"[packed {label}] pipeline: {row['pipeline']} vs 1k: {out['pipeline_1k']}", flush=True)
        out[label] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="", help="comma-separated tile counts, e.g. 1M,20M,190M")
    ap.add_argument("--slides", type=int, default=0, help="slide copies for the handle-LRU read benchmark")
    ap.add_argument("--handles", type=int, default=64)
    ap.add_argument("--packed", default="", help="comma-separated record counts for the packed benchmark")
    ap.add_argument("--tmp", type=Path, help="scratch folder (default: a temporary one; 190M needs ~12 GB)")
    ap.add_argument("--keep", action="store_true", help="keep the generated JSON and indexes")
    ap.add_argument("--json-out", type=Path, help="also write the results here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.tmp))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    results = {"machine": f"{os.cpu_count()} cores, {ram:.0f} GiB"}
    try:
        real = make_real_tiles(tmp / "real_tiles")
        small = tmp / "1k"
        small.mkdir()
        _child("_build", str(make_json(small, 1000, real)), str(small / "index"))
        for s in filter(None, args.sizes.split(",")):
            results[s] = bench_size(_parse_size(s), tmp, real, small / "index")
        if args.packed:  # "--packed real": only the real-tile figures
            results["packed"] = bench_packed([_parse_size(x) for x in args.packed.split(",") if x not in ("", "real")],
                                             tmp, small / "index")
        if args.slides:
            results["slides"] = bench_slides(args.slides, args.handles, tmp)
    finally:
        print(json.dumps(results, indent=1))
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1))
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        fn = {"_build": child_build, "_open": child_open, "_pipeline": child_pipeline, "_slides": child_slides,
              "_packed_open": child_packed_open, "_rates": child_read_rates}
        print(json.dumps(fn[sys.argv[1]](*sys.argv[2:])))
    else:
        main()
