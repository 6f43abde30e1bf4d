"""The extraction loops: tiles -> one HDF5 file; slides -> one HDF5 file each, resumable, failures isolated.

Overlap: a thread pool reads and resizes batch k+1 (loader.prefetch_batches) while the device encodes batch k, and
the host copies batch k-1's features into the HDF5 file only after batch k has been dispatched. Slides are one
stream: batches run across slide boundaries (tissue detection of the next slide happens in the reader thread), so
the fixed batch shape is padded once per run, not once per slide (small biopsies would otherwise waste up to a
batch of compute each).

Scale: the encoder runs on every local device (encoder.py); several processes (the hosts of a pod) each take their
share of the input (share.py); slides and outputs may live on object storage (remote.py, h5out.py). The progress
line shows tiles/s and which side waits: the readers (the next batch was not ready: add --workers) or the devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
from tqdm import tqdm

from gpfm_jax import storage
from gpfm_jax.extract import share as share_lib
from gpfm_jax.extract.encoder import FeatureEncoder
from gpfm_jax.extract.h5out import AtomicH5, reserve_bytes
from gpfm_jax.extract.inputs import TileInput
from gpfm_jax.extract.loader import Batch, prefetch_batches
from gpfm_jax.extract.preprocess import resize_tile
from gpfm_jax.extract.remote import SlideCache
from gpfm_jax.extract.share import Share
from gpfm_jax.extract.slide_io import SlideReader, TilingOptions, plan_slide

log = logging.getLogger("gpfm_jax.extract")

SlideOptions = TilingOptions  # the public name for the tiling options of whole-slide extraction


READERS_PER_DEVICE = 6  # reader threads per device by default (bounded by the cores); see docs/extract.md


def default_workers(num_devices: int) -> int:
    """Reader threads: enough for the devices (about 2 busy cores per chip at ViT-L, docs/extract.md), at most one per
    core (openslide, JPEG/PNG decoding and PIL's resize release the GIL), at least 2."""
    return max(2, min(os.cpu_count() or 1, READERS_PER_DEVICE * num_devices))


@dataclasses.dataclass
class LoaderOptions:
    workers: int | None = None  # reader threads; None: default_workers(the encoder's device count)
    depth: int = 2  # finished batches waiting for the encoder
    progress: bool = True
    cache_dir: str | None = None  # where slides named by URL are downloaded (default: the system temp folder)
    cache_bytes: int = 8 << 30  # bound on the downloaded, not yet tiled slides
    merge_wait_s: float = 24 * 3600.0  # process 0 waits this long for the other processes' tile-set parts

    def threads(self, encoder: FeatureEncoder) -> int:
        return self.workers or default_workers(encoder.num_devices)


class Pace:
    """Where the consumer's time goes: waiting for the readers (the next batch was not ready) or for the devices
    (the batch before had not finished) — the progress line names the side that waits."""

    def __init__(self):
        self.start, self.reader, self.device, self.tiles = time.perf_counter(), 0.0, 0.0, 0

    def __str__(self) -> str:  # tqdm shows tiles/s next to it
        side = "readers" if self.reader > self.device else "devices"
        return f"{side} bound: waited {self.reader:.0f} s for readers, {self.device:.0f} s for devices"


@dataclasses.dataclass
class TilesResult:
    out: Path
    num_tiles: int
    failed: list[tuple[str, str]]  # (path, reason) of tiles that could not be read
    skipped: bool = False  # the output already existed
    seconds: float = 0.0
    incomplete: bool = False  # process 0 gave up waiting for other processes' parts (a rerun finishes them)


@dataclasses.dataclass
class SlidesReport:
    done: list[tuple[Path, int]] = dataclasses.field(default_factory=list)  # (slide, tiles)
    skipped: list[Path] = dataclasses.field(default_factory=list)  # finished in an earlier run
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # (slide, reason)
    seconds: float = 0.0
    pace: str = ""  # which side waited (Pace)

    @property
    def num_tiles(self) -> int:
        return sum(n for _, n in self.done)


def encode_stream(encoder: FeatureEncoder, batches: Iterator[Batch],
                  pace: Pace | None = None) -> Iterator[tuple[Batch, np.ndarray]]:
    """(batch, float32 [n, D] features) in order, with batch k+1 dispatched before batch k's result is fetched."""
    pace = pace or Pace()
    pending: tuple[Batch, object] | None = None
    batches = iter(batches)
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        pace.reader += t1 - t
        if batch is None:
            break
        out = encoder.dispatch(batch.tiles) if batch.items else None  # may block while the devices' queue is full
        pace.device += time.perf_counter() - t1
        if pending is not None:
            yield pending[0], _fetch(encoder, *pending, pace)
        pending = (batch, out)
    if pending is not None:
        yield pending[0], _fetch(encoder, *pending, pace)


def _fetch(encoder: FeatureEncoder, batch: Batch, out, pace: Pace) -> np.ndarray:
    pace.tiles += len(batch.items)
    if out is None:
        return np.zeros((0, encoder.feature_dim), np.float32)
    t = time.perf_counter()
    feats = np.asarray(out)[: len(batch.items)]
    pace.device += time.perf_counter() - t
    return feats


def _preprocessed(encoder: FeatureEncoder, read_raw: Callable[[object], np.ndarray]) -> Callable[[object], np.ndarray]:
    size, interp = encoder.input_size, encoder.interpolation
    return lambda item: resize_tile(read_raw(item), size, interp)


def _bar(total: int, desc: str, enabled: bool, unit: str = "tile") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def extract_tiles(encoder: FeatureEncoder, tiles: TileInput, out: str | os.PathLike,
                  loader: LoaderOptions | None = None, overwrite: bool = False,
                  share: Share | None = None) -> TilesResult:
    """Tile files -> `out` with `features` f32 [N, D] and `paths` [N] (relative to the input root). Unreadable
    tiles are skipped and listed in `failed_paths`; if none is readable, nothing is written and ValueError raised.
    With several processes (`share`), each writes its range as a part file and process 0 merges them (share.py)."""
    loader, share = loader or LoaderOptions(), share or Share()
    out = storage.resolve(out) if storage.is_url(out) else Path(out)
    start = time.perf_counter()
    if out.exists() and not overwrite:
        log.info("%s exists: skipped (pass --overwrite to redo it)", out)
        return TilesResult(out, 0, [], skipped=True)
    if share.alone:
        written, failed = _tiles_file(encoder, tiles, range(len(tiles.paths)), out, loader, {})
        return TilesResult(out, written, failed, seconds=time.perf_counter() - start)
    if storage.is_url(out):
        raise ValueError(f"--out {out}: several processes write a tile set as parts on a shared local folder; "
                         "give a local (shared) path, or run one process")
    part = share_lib.part_path(out, share)
    written, failed = 0, []
    if part.exists() and not overwrite:
        log.info("%s exists: this process's part is done", part)
    else:
        written, failed = _tiles_file(encoder, tiles, share_lib.tile_range(len(tiles.paths), share), part, loader,
                                      {"part": share.index, "parts": share.count})
    result = TilesResult(out, written, failed, seconds=time.perf_counter() - start)
    if share.index == 0 and not share_lib.merge_parts(out, share, loader.merge_wait_s):
        result.incomplete = True
    return result


def _tiles_file(encoder: FeatureEncoder, tiles: TileInput, indices: range, out, loader: LoaderOptions,
                extra: dict) -> tuple[int, list[tuple[str, str]]]:
    from gpfm_jax.data.sources import BadImageError, read_image_file

    failed: list[tuple[str, str]] = []
    written = 0
    attrs = {**encoder.attrs(), "kind": "tiles", "input": tiles.origin, "root": tiles.root, **extra}
    reserve = reserve_bytes(len(indices), 4 * encoder.feature_dim + 256)  # features + a relative path
    pace = Pace()
    with AtomicH5(out, attrs, reserve=reserve, staging=loader.cache_dir) as h5, \
            _bar(len(indices), out.name, loader.progress) as bar:
        h5.create("features", (encoder.feature_dim,), np.float32)
        h5.create("paths", (), h5py.string_dtype())
        read = _preprocessed(encoder, lambda i: read_image_file(tiles.paths[i]))
        batches = prefetch_batches(indices, read, encoder.batch_size,
                                   workers=loader.threads(encoder), depth=loader.depth, skip=(BadImageError,))
        with contextlib.closing(batches):  # on error: stop the reader threads now, not at garbage collection
            for batch, feats in encode_stream(encoder, batches, pace):
                h5.append("features", feats)
                h5.append("paths", [os.path.relpath(tiles.paths[p], tiles.root) for p in batch.items])
                for p, reason in batch.failures:
                    failed.append((tiles.paths[p], reason))
                    if len(failed) <= 5:
                        log.warning("unreadable tile skipped: %s", reason)
                written += len(batch.items)
                bar.update(len(batch.items) + len(batch.failures))
                bar.set_postfix_str(str(pace), refresh=False)
        if written == 0 and not extra:  # a part may legitimately hold no readable tile
            raise ValueError(f"{tiles.origin}: none of the {len(indices)} tiles could be read")
        h5.create("failed_paths", (), h5py.string_dtype())
        h5.append("failed_paths", [p for p, _ in failed])
        h5.set_attrs(num_tiles=written, num_failed=len(failed))
    return written, failed


class _SlideJob:
    """One slide in the stream: plan and reader (set in the reader thread before any of its tiles is yielded),
    output file (consumer side)."""

    def __init__(self, slide, target):
        self.slide, self.target = slide, target  # slide: a Path, or a URL string
        self.reads = 0  # reads finished (reader threads; under _reads_lock), for releasing a downloaded slide
        self.plan = None
        self.plan_error: str | None = None
        self.reader: SlideReader | None = None
        self.out: AtomicH5 | None = None
        self.seen = 0  # tiles read or failed so far; the slide is complete when seen == number of tiles
        self.error: str | None = None

    @property
    def num_tiles(self) -> int:
        return len(self.plan.coords)

    def open(self, encoder: FeatureEncoder, staging: str | None = None) -> AtomicH5:
        if self.out is None:
            plan = self.plan
            reserve = reserve_bytes(len(plan.coords), 4 * encoder.feature_dim + 16)  # features + coords
            source = str(self.slide) if storage.is_url(self.slide) else str(Path(self.slide).absolute())
            attrs = {**encoder.attrs(), **plan.attrs(), "kind": "slide", "slide": source,
                     "slide_id": storage.resolve(self.slide).stem}  # the slide's own name, not its cached copy's
            self.out = AtomicH5(self.target, attrs, reserve=reserve, staging=staging).__enter__()
            self.out.create("features", (encoder.feature_dim,), np.float32)
            self.out.create("coords", (2,), np.int64, attrs={
                "patch_level": 0, "patch_size": plan.level0_tile_size, "tile_size": plan.tile_size,
                "magnification": plan.magnification})
        return self.out

    def commit(self) -> None:
        out, self.out = self.out, None
        out.__exit__(None, None, None)

    def abort(self) -> None:
        if self.out is not None:
            out, self.out = self.out, None
            out.__exit__(RuntimeError, RuntimeError("aborted"), None)  # deletes the partial file

    def close_reader(self) -> None:  # only once no read of this slide can be in flight
        if self.reader is not None:
            reader, self.reader = self.reader, None
            reader.close()


class _Marker(Exception):
    """Stands in the tile stream for a slide without tiles (planning failed, or no tissue), so the consumer hears
    about it in order."""


def slide_outputs(slides: list, out: str | os.PathLike) -> list:
    """Output file per slide: `out` itself for one slide and an .h5 `out`, else `out/<slide stem>.h5` (Paths, or
    epath Paths when `out` is a URL)."""
    out = storage.resolve(out) if storage.is_url(out) else Path(out)
    if out.suffix.lower() == ".h5":
        if len(slides) != 1:
            raise ValueError(f"--out {out} is a file, but there are {len(slides)} slides: give a folder")
        return [out]
    targets = [out / f"{storage.resolve(s).stem if storage.is_url(s) else Path(s).stem}.h5" for s in slides]
    seen: dict[Path, Path] = {}
    for s, t in zip(slides, targets):
        if t in seen:
            raise ValueError(f"slides {seen[t]} and {s} would both write {t}: rename one or split the input")
        seen[t] = s
    return targets


def _finished(targets: list) -> set[str]:
    """The targets that exist, with one listing per output folder (not one request per slide on a bucket)."""
    names: dict[str, set[str]] = {}
    for parent in {str(t.parent) for t in targets}:
        if storage.is_url(parent):
            import fsspec

            fsspec.filesystem(storage.scheme(parent)).invalidate_cache()  # another process may have written since
        folder = storage.resolve(parent) if storage.is_url(parent) else Path(parent)
        try:
            names[parent] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        except FileNotFoundError:
            names[parent] = set()
    return {str(t) for t in targets if t.name in names[str(t.parent)]}


def extract_slides(encoder: FeatureEncoder, slides: list, out: str | os.PathLike,
                   tiling: TilingOptions | None = None, loader: LoaderOptions | None = None,
                   share: Share | None = None) -> SlidesReport:
    """Every slide to its own file (CLAM layout: `features` f32 [N, D], `coords` int64 [N, 2] level-0 (x, y), with
    coords.attrs patch_level = 0 and patch_size = the level-0 span, so CLAM's own reader re-reads the same tiles).

    A finished file is skipped (resume). A slide that cannot be opened, tiled or read is reported and the others
    go on. An interrupted slide leaves no file under its final name, so it is redone next time. With several
    processes (`share`) this one does its size-balanced share only (share.py). Slides named by URL are downloaded
    through a bounded cache (remote.py); an output URL gets each file uploaded whole.
    """
    tiling, loader, share = tiling or TilingOptions(), loader or LoaderOptions(), share or Share()
    report = SlidesReport()
    start = time.perf_counter()
    targets = slide_outputs(slides, out)  # for every slide: name clashes are found the same way by every process
    remote = any(storage.is_url(s) for s in slides)
    sizes = share_lib.file_sizes(slides) if remote or not share.alone else None  # one request per URL, once
    mine = range(len(slides))
    if not share.alone:
        mine = share_lib.balanced_split(sizes, share.count)[share.index]
        log.info("process %d of %d: %d of %d slides", share.index, share.count, len(mine), len(slides))
    done = _finished([targets[i] for i in mine])
    jobs: list[_SlideJob] = []
    todo: list[int] = []
    for i in mine:
        if str(targets[i]) in done:
            report.skipped.append(slides[i])
            log.info("%s: %s exists, skipped", slides[i], targets[i])
        else:
            jobs.append(_SlideJob(slides[i], targets[i]))
            todo.append(i)
    cache = SlideCache([str(slides[i]) for i in todo], [sizes[i] for i in todo], loader.cache_dir,
                       loader.cache_bytes) if remote else None
    reads_lock = threading.Lock()

    def items():  # consumed in the reader thread: each slide is tiled just before its tiles are needed
        for j, job in enumerate(jobs):
            try:
                local = cache.acquire(j) if cache else job.slide
                job.plan = plan_slide(local, tiling)
                job.reader = SlideReader(job.plan)
            except Exception as e:  # noqa: BLE001 - reported per slide
                job.plan_error = f"{type(e).__name__}: {e}"
            if job.plan_error is not None or job.num_tiles == 0:
                if cache:
                    cache.release(j)
                yield (j, -1)
            else:
                yield from ((j, i) for i in range(job.num_tiles))

    def read(item) -> np.ndarray:
        try:
            return _read(item)
        finally:
            j, i = item
            if cache and i >= 0:
                with reads_lock:
                    jobs[j].reads += 1
                    last = jobs[j].reads == jobs[j].num_tiles
                if last:  # every tile of the slide is read: its download can go
                    cache.release(j)

    def _read(item) -> np.ndarray:
        j, i = item
        if i < 0:
            raise _Marker()
        return resize_tile(jobs[j].reader(i), encoder.input_size, encoder.interpolation)

    def settle(job: _SlideJob, bar) -> None:
        """After the last tile of a slide: commit it (or drop it if a tile failed), release its file handle."""
        job.close_reader()
        if job.error is None:
            job.open(encoder, loader.cache_dir)  # an empty, complete file for a slide without tissue tiles
            job.commit()
            report.done.append((job.slide, job.seen))
            log.info("%s: %d tiles -> %s", job.slide, job.seen, job.target)
        status[0] = f"{len(report.done)}/{len(jobs)} slides done, {len(report.failed)} failed"

    def fail(job: _SlideJob, reason: str) -> None:
        if job.error is None:
            job.error = reason
            job.abort()
            report.failed.append((job.slide, reason))
            log.error("%s: FAILED, skipped (%s)", job.slide, reason)

    def route(batch: Batch, feats: np.ndarray, bar) -> None:
        """Append a batch's rows to their slides' files; record failures; settle slides whose last tile is in."""
        touched = sorted({j for j, _ in batch.items} | {j for (j, _), _ in batch.failures})
        for j in touched:
            if jobs[j].seen == 0 and jobs[j].plan_error is None:  # first tiles of this slide
                bar.total += jobs[j].num_tiles
                bar.refresh()
        bar.update(len(batch.items) + sum(1 for (_, i), _ in batch.failures if i >= 0))
        for (j, i), reason in batch.failures:
            job = jobs[j]
            if i >= 0:
                fail(job, f"tile at {tuple(int(v) for v in job.plan.coords[i])}: {reason}")
                job.seen += 1
            elif job.plan_error is not None:
                fail(job, job.plan_error)
            else:
                log.warning("%s: no tissue tiles at %gx / %d px; writing an empty feature file",
                            job.slide, job.plan.magnification, job.plan.tile_size)
        rows: dict[int, list[int]] = {}
        for r, (j, _) in enumerate(batch.items):
            rows.setdefault(j, []).append(r)
        for j in touched:  # slide order: a slide is committed before the next one's file is opened
            job = jobs[j]
            rs = rows.get(j, [])
            job.seen += len(rs)
            if rs and job.error is None:
                out_file = job.open(encoder, loader.cache_dir)
                out_file.append("features", feats[rs])
                out_file.append("coords", job.plan.coords[[batch.items[r][1] for r in rs]])
            if job.plan_error is not None or job.seen == job.num_tiles:
                settle(job, bar)

    status, pace = [f"0/{len(jobs)} slides done"], Pace()
    with _bar(0, "tiles", loader.progress) as bar:  # the total grows as slides are tiled
        batches = prefetch_batches(items(), read, encoder.batch_size, workers=loader.threads(encoder),
                                   depth=loader.depth, skip=(Exception,))
        try:
            with contextlib.closing(batches):
                for batch, feats in encode_stream(encoder, batches, pace):
                    route(batch, feats, bar)
                    bar.set_postfix_str(f"{status[0]}; {pace}", refresh=False)
        finally:
            for job in jobs:  # the reader threads have stopped here: every handle can be closed
                job.abort()
                job.close_reader()
            if cache:
                cache.close()
    report.seconds, report.pace = time.perf_counter() - start, str(pace)
    return report
