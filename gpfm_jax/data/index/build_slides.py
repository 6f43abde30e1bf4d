"""Building a "slides" index: the tissue tiles of many whole-slide images, tiled in parallel processes, resumable.

Each slide is tiled by `data.slides.tile_coordinates` (thumbnail + Otsu, the same call and parameters as
`SlideTileSource`, so the tiles and their order are the same). Finished slides are saved one file each in a
`.<out>.partial/` folder next to the output; a build that was killed starts again from there (same arguments
required). A slide that cannot be read is named on stderr, skipped and counted, and listed in the index's
`skipped.tsv`; a slide that kills its worker process (a crash inside the slide library) is retried alone and, if it
kills it again, skipped the same way. Slides are kept in list order, tiles in grid order.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gpfm_jax.data import slides as slides_lib
from gpfm_jax.data.index.store import IndexWriter

LIST_EXTENSIONS = (".txt", ".lst", ".list")
_GLOB_CHARS = set("*?[")
Report = Callable[[str], None]


def read_slide_list(spec: str | os.PathLike) -> list[str]:
    """Slide paths from a text file (one per line, relative lines against the file's folder; blank lines and '#'
    comments skipped), a glob pattern (sorted, '**' recursive), or a single slide file."""
    spec = str(spec)
    if _GLOB_CHARS & set(spec) and not Path(spec).exists():
        paths = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise FileNotFoundError(f"no slide files match {spec!r}")
        return paths
    p = Path(spec)
    if p.suffix.lower() not in LIST_EXTENSIONS:
        return [str(p)]  # one slide (whoever reads it reports it if it is missing)
    if not p.is_file():
        raise FileNotFoundError(f"slide list not found: {p}")
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            q = Path(line)
            out.append(str(q if q.is_absolute() else p.parent / q))
    if not out:
        raise ValueError(f"slide list {p} names no slides")
    return out


def tile_slide(path: str, params: dict[str, Any]) -> dict[str, Any]:
    """One slide's tiles and what it takes to read them back (runs in a worker process)."""
    grid = slides_lib.tile_coordinates(path, **params)
    coords = grid.coords
    if coords.size and (coords.max() >= 2**31 or coords.min() < 0):
        raise ValueError(f"level-0 coordinates of {path} do not fit int32")
    info = grid.info
    return {"coords": coords.astype(np.int32).reshape(-1, 2), "level0_size": int(grid.level0_size),
            "downsamples": list(info.level_downsamples), "dims": [info.width, info.height],
            "mpp": float("nan") if info.mpp is None else info.mpp, "magnification": info.base_magnification}


Tiler = Callable[[str, dict], dict]


def _guarded(i: int, path: str, params: dict[str, Any], tiler: Tiler) -> tuple[int, dict[str, Any] | None, str | None]:
    try:
        return i, tiler(path, params), None
    except Exception as e:  # noqa: BLE001 - any failure of one slide is reported, never fatal
        return i, None, f"{type(e).__name__}: {e}"


class _Partial:
    """The resumable state of one build: a folder with the arguments and one .npz per finished slide."""

    def __init__(self, out: Path, paths: Sequence[str], params: dict[str, Any]):
        self.dir = out.parent / f".{out.name}.partial"
        key = hashlib.sha256(json.dumps({"paths": list(paths), "params": params}, sort_keys=True).encode())
        args = {"params": params, "num_slides": len(paths), "key": key.hexdigest()}
        if self.dir.exists():
            old = json.loads((self.dir / "args.json").read_text()) if (self.dir / "args.json").is_file() else None
            if old != args:
                raise ValueError(f"{self.dir} holds a stopped build with other slides or parameters; delete it or "
                                 "run the build with the same arguments to resume it")
        else:
            (self.dir / "done").mkdir(parents=True)
            (self.dir / "args.json").write_text(json.dumps(args))

    def file(self, i: int) -> Path:
        return self.dir / "done" / f"{i:08d}.npz"

    def done(self) -> set[int]:
        return {int(p.stem) for p in (self.dir / "done").glob("*.npz")}

    def save(self, i: int, r: dict[str, Any]) -> None:
        tmp = self.dir / "done" / f"{i:08d}.tmp.npz"
        meta = {k: v for k, v in r.items() if k != "coords"}
        np.savez(tmp, coords=r["coords"], meta=json.dumps(meta))
        os.replace(tmp, self.file(i))

    def load(self, i: int) -> dict[str, Any]:
        with np.load(self.file(i), allow_pickle=False) as z:
            return {"coords": z["coords"], **json.loads(str(z["meta"]))}


def _run_pool(todo: list[int], paths: Sequence[str], params: dict[str, Any], workers: int, tiler: Tiler,
              on_result: Callable[[int, dict | None, str | None], None]) -> tuple[list[int], list[int]]:
    """Tiles `todo` in `workers` spawned processes, at most 2 per worker in flight. If a worker process dies (the
    pool is then broken), returns (the slides in flight then: suspects, the slides not started); else ([], [])."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(reversed(todo))
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        try:  # a pool that cannot start at all is the environment's fault, not a slide's
            pool.submit(os.getpid).result()
        except cf.process.BrokenProcessPool as e:
            raise RuntimeError(f"cannot start slide tiling processes (spawn): {e}; with --workers 1 the slides are "
                               "tiled in this process") from None
        running: dict[cf.Future, int] = {}
        while pending or running:
            while pending and len(running) < 2 * workers:
                i = pending.pop()
                running[pool.submit(_guarded, i, paths[i], params, tiler)] = i
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            broken = []
            for fut in finished:
                i = running.pop(fut)
                try:
                    result = fut.result()
                except cf.process.BrokenProcessPool:
                    broken.append(i)
                    continue
                on_result(*result)
            if broken:
                return sorted(broken + list(running.values())), list(reversed(pending))
    return [], []


def tile_all(paths: Sequence[str], partial: _Partial, params: dict[str, Any], workers: int, report: Report,
             tiler: Tiler = tile_slide) -> dict[int, str]:
    """Tiles every slide not yet in `partial`; returns {slide: reason} for the ones skipped."""
    failed: dict[int, str] = {}
    todo = sorted(set(range(len(paths))) - partial.done())
    if len(todo) < len(paths):
        report(f"resuming: {len(paths) - len(todo)} of {len(paths)} slides already tiled in {partial.dir}")
    n_done = [len(paths) - len(todo)]

    def on_result(i: int, r: dict | None, err: str | None) -> None:
        if r is None:
            failed[i] = err or "unknown error"
            report(f"skipped slide {paths[i]}: {failed[i]}")
        else:
            partial.save(i, r)
        n_done[0] += 1
        if n_done[0] % 1000 == 0:
            report(f"{n_done[0]} / {len(paths)} slides")

    if workers <= 1:
        for i in todo:
            on_result(*_guarded(i, paths[i], params, tiler))
        return failed
    while todo:
        suspects, todo = _run_pool(todo, paths, params, workers, tiler, on_result)
        for i in suspects:  # a worker died with these in flight: retry each alone to find the culprit
            if _run_pool([i], paths, params, 1, tiler, on_result)[0]:
                on_result(i, None, "the slide reader crashed its process, twice")
    return failed


def build_from_slides(slides: str | os.PathLike | Sequence[str], out: str | os.PathLike, *, tile_size: int = 224,
                      magnification: float = 20.0, min_tissue: float = 0.5, workers: int = 0,
                      overwrite: bool = False, report: Report | None = None, tiler: Tiler = tile_slide,
                      **tiling: Any) -> Path:
    """Slides (a list file, a glob, or a sequence of paths) -> a "slides" index at `out`.

    workers: tiling processes (0 = os.cpu_count(); 1 = in this process). Extra `tiling` keywords go to
    tile_coordinates (stride, thumbnail_max, min_saturation, default_magnification). `tiler(path, params)` is
    `tile_slide` (a module-level function, since it is sent to the worker processes; tests pass failing ones).
    """
    report = report or (lambda msg: print(f"gpfm-index: {msg}", file=sys.stderr, flush=True))
    spec = str(slides) if isinstance(slides, (str, os.PathLike)) else None
    paths = read_slide_list(slides) if spec is not None else [str(p) for p in slides]
    # Stored absolute: an index built from a relative glob in one folder is read (verify, training) from others.
    paths = [p if "://" in p else os.path.abspath(p) for p in paths]
    if not paths:
        raise ValueError("no slides given")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    params = {"tile_size": int(tile_size), "magnification": float(magnification), "min_tissue": float(min_tissue),
              **tiling}
    partial = _Partial(out, paths, params)
    workers = min(workers or os.cpu_count() or 1, len(paths))  # 1: in this process (no spawn cost)
    failed = tile_all(paths, partial, params, workers, report, tiler)
    kept = [i for i in range(len(paths)) if i not in failed]
    if not kept:
        raise ValueError(f"none of the {len(paths)} slides could be read; first: {paths[0]}: {failed.get(0)}")
    with IndexWriter(out, "slides", overwrite) as w:
        names, coords = w.blob("slide_names.bin"), w.column("coords", "<i4", (2,))
        name_offsets, starts, level0, dims, mag, mpp, downs = [0], [0], [], [], [], [], []
        for i in kept:
            r = partial.load(i)
            names.write(os.fsencode(paths[i]))
            name_offsets.append(names.offset)
            coords.append(r["coords"])
            starts.append(coords.rows)
            level0.append(r["level0_size"])
            dims.append(r["dims"])
            mag.append(r["magnification"])
            mpp.append(r["mpp"])
            downs.append(r["downsamples"])
        if coords.rows == 0:
            raise ValueError(f"no tissue tiles found in the {len(kept)} readable slides (first: {paths[kept[0]]})")
        depth = max(len(d) for d in downs)
        w.array("slide_name_offsets", name_offsets, "<u8")
        w.array("tile_starts", starts, "<i8")
        w.array("level0_size", level0, "<i8")
        w.array("num_levels", [len(d) for d in downs], "<i4")
        w.array("level_downsamples", [d + [0.0] * (depth - len(d)) for d in downs], "<f8")
        w.array("slide_dims", dims, "<i8")
        w.array("slide_magnification", mag, "<f8")
        w.array("slide_mpp", mpp, "<f8")
        skipped = "".join(f"{paths[i]}\t{failed[i]}\n" for i in sorted(failed))
        (w.tmp / "skipped.tsv").write_text("slide\treason\n" + skipped)
        result = w.commit({"num_tiles": coords.rows, "num_slides": len(kept)},
                          {"from": "slides", "slides": spec or f"{len(paths)} paths", "params": params},
                          {"tile_size": int(tile_size), "num_skipped_slides": len(failed)})
    shutil.rmtree(partial.dir, ignore_errors=True)
    report(f"{len(kept)} slides tiled, {int(starts[-1])} tiles, {len(failed)} slides skipped"
           + (f" (listed in {result / 'skipped.tsv'})" if failed else ""))
    return result
