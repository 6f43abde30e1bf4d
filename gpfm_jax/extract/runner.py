"""The extraction loops: tiles -> one HDF5 file; slides -> one HDF5 file each, resumable, failures isolated.

Overlap: a thread pool reads and resizes batch k+1 (loader.prefetch_batches) while the device encodes batch k, and
the host copies batch k-1's features into the HDF5 file only after batch k has been dispatched. Slides are one
stream: batches run across slide boundaries (tissue detection of the next slide happens in the reader thread), so
the fixed batch shape is padded once per run, not once per slide (small biopsies would otherwise waste up to a
batch of compute each).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
from tqdm import tqdm

from gpfm_jax.extract.encoder import FeatureEncoder
from gpfm_jax.extract.h5out import AtomicH5, reserve_bytes
from gpfm_jax.extract.inputs import TileInput
from gpfm_jax.extract.loader import Batch, prefetch_batches
from gpfm_jax.extract.preprocess import resize_tile
from gpfm_jax.extract.slide_io import SlideReader, TilingOptions, plan_slide

log = logging.getLogger("gpfm_jax.extract")

SlideOptions = TilingOptions  # the public name for the tiling options of whole-slide extraction


@dataclasses.dataclass
class LoaderOptions:
    workers: int = min(8, os.cpu_count() or 1)  # reader threads
    depth: int = 2  # finished batches waiting for the encoder
    progress: bool = True


@dataclasses.dataclass
class TilesResult:
    out: Path
    num_tiles: int
    failed: list[tuple[str, str]]  # (path, reason) of tiles that could not be read
    skipped: bool = False  # the output already existed
    seconds: float = 0.0


@dataclasses.dataclass
class SlidesReport:
    done: list[tuple[Path, int]] = dataclasses.field(default_factory=list)  # (slide, tiles)
    skipped: list[Path] = dataclasses.field(default_factory=list)  # finished in an earlier run
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # (slide, reason)
    seconds: float = 0.0

    @property
    def num_tiles(self) -> int:
        return sum(n for _, n in self.done)


def encode_stream(encoder: FeatureEncoder, batches: Iterator[Batch]) -> Iterator[tuple[Batch, np.ndarray]]:
    """(batch, float32 [n, D] features) in order, with batch k+1 dispatched before batch k's result is fetched."""
    pending: tuple[Batch, object] | None = None
    for batch in batches:
        out = encoder.dispatch(batch.tiles) if batch.items else None
        if pending is not None:
            yield pending[0], _fetch(encoder, *pending)
        pending = (batch, out)
    if pending is not None:
        yield pending[0], _fetch(encoder, *pending)


def _fetch(encoder: FeatureEncoder, batch: Batch, out) -> np.ndarray:
    if out is None:
        return np.zeros((0, encoder.feature_dim), np.float32)
    return np.asarray(out)[: len(batch.items)]


def _preprocessed(encoder: FeatureEncoder, read_raw: Callable[[object], np.ndarray]) -> Callable[[object], np.ndarray]:
    size, interp = encoder.input_size, encoder.interpolation
    return lambda item: resize_tile(read_raw(item), size, interp)


def _bar(total: int, desc: str, enabled: bool, unit: str = "tile") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def extract_tiles(encoder: FeatureEncoder, tiles: TileInput, out: str | os.PathLike,
                  loader: LoaderOptions | None = None, overwrite: bool = False) -> TilesResult:
    """Tile files -> `out` with `features` f32 [N, D] and `paths` [N] (relative to the input root). Unreadable
    tiles are skipped and listed in `failed_paths`; if none is readable, nothing is written and ValueError raised."""
    from gpfm_jax.data.sources import BadImageError, read_image_file

    loader = loader or LoaderOptions()
    out = Path(out)
    start = time.perf_counter()
    if out.exists() and not overwrite:
        log.info("%s exists: skipped (pass --overwrite to redo it)", out)
        return TilesResult(out, 0, [], skipped=True)
    failed: list[tuple[str, str]] = []
    written = 0
    attrs = {**encoder.attrs(), "kind": "tiles", "input": tiles.origin, "root": tiles.root}
    reserve = reserve_bytes(len(tiles.paths), 4 * encoder.feature_dim + 256)  # features + a relative path
    with AtomicH5(out, attrs, reserve=reserve) as h5, _bar(len(tiles.paths), out.name, loader.progress) as bar:
        h5.create("features", (encoder.feature_dim,), np.float32)
        h5.create("paths", (), h5py.string_dtype())
        read = _preprocessed(encoder, lambda i: read_image_file(tiles.paths[i]))
        batches = prefetch_batches(range(len(tiles.paths)), read, encoder.batch_size,
                                   workers=loader.workers, depth=loader.depth, skip=(BadImageError,))
        with contextlib.closing(batches):  # on error: stop the reader threads now, not at garbage collection
            for batch, feats in encode_stream(encoder, batches):
                h5.append("features", feats)
                h5.append("paths", [os.path.relpath(tiles.paths[p], tiles.root) for p in batch.items])
                for p, reason in batch.failures:
                    failed.append((tiles.paths[p], reason))
                    if len(failed) <= 5:
                        log.warning("unreadable tile skipped: %s", reason)
                written += len(batch.items)
                bar.update(len(batch.items) + len(batch.failures))
        if written == 0:
            raise ValueError(f"{tiles.origin}: none of the {len(tiles.paths)} tiles could be read")
        h5.create("failed_paths", (), h5py.string_dtype())
        h5.append("failed_paths", [p for p, _ in failed])
        h5.set_attrs(num_tiles=written, num_failed=len(failed))
    return TilesResult(out, written, failed, seconds=time.perf_counter() - start)


class _SlideJob:
    """One slide in the stream: plan and reader (set in the reader thread before any of its tiles is yielded),
    output file (consumer side)."""

    def __init__(self, slide: Path, target: Path):
        self.slide, self.target = slide, target
        self.plan = None
        self.plan_error: str | None = None
        self.reader: SlideReader | None = None
        self.out: AtomicH5 | None = None
        self.seen = 0  # tiles read or failed so far; the slide is complete when seen == number of tiles
        self.error: str | None = None

    @property
    def num_tiles(self) -> int:
        return len(self.plan.coords)

    def open(self, encoder: FeatureEncoder) -> AtomicH5:
        if self.out is None:
            plan = self.plan
            reserve = reserve_bytes(len(plan.coords), 4 * encoder.feature_dim + 16)  # features + coords
            self.out = AtomicH5(self.target, {**encoder.attrs(), **plan.attrs(), "kind": "slide"},
                                reserve=reserve).__enter__()
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


def slide_outputs(slides: list[Path], out: str | os.PathLike) -> list[Path]:
    """Output file per slide: `out` itself for one slide and an .h5 `out`, else `out/<slide stem>.h5`."""
    out = Path(out)
    if out.suffix.lower() == ".h5":
        if len(slides) != 1:
            raise ValueError(f"--out {out} is a file, but there are {len(slides)} slides: give a folder")
        return [out]
    targets = [out / f"{Path(s).stem}.h5" for s in slides]
    seen: dict[Path, Path] = {}
    for s, t in zip(slides, targets):
        if t in seen:
            raise ValueError(f"slides {seen[t]} and {s} would both write {t}: rename one or split the input")
        seen[t] = s
    return targets


def extract_slides(encoder: FeatureEncoder, slides: list[Path], out: str | os.PathLike,
                   tiling: TilingOptions | None = None, loader: LoaderOptions | None = None) -> SlidesReport:
    """Every slide to its own file (CLAM layout: `features` f32 [N, D], `coords` int64 [N, 2] level-0 (x, y), with
    coords.attrs patch_level = 0 and patch_size = the level-0 span, so CLAM's own reader re-reads the same tiles).

    A finished file is skipped (resume). A slide that cannot be opened, tiled or read is reported and the others
    go on. An interrupted slide leaves no file under its final name, so it is redone next time.
    """
    tiling, loader = tiling or TilingOptions(), loader or LoaderOptions()
    report = SlidesReport()
    start = time.perf_counter()
    jobs: list[_SlideJob] = []
    for slide, target in zip(slides, slide_outputs(slides, out)):
        if target.exists():
            report.skipped.append(Path(slide))
            log.info("%s: %s exists, skipped", slide, target)
        else:
            jobs.append(_SlideJob(Path(slide), target))

    def items():  # consumed in the reader thread: each slide is tiled just before its tiles are needed
        for j, job in enumerate(jobs):
            try:
                job.plan = plan_slide(job.slide, tiling)
                job.reader = SlideReader(job.plan)
            except Exception as e:  # noqa: BLE001 - reported per slide
                job.plan_error = f"{type(e).__name__}: {e}"
            if job.plan_error is not None or job.num_tiles == 0:
                yield (j, -1)
            else:
                yield from ((j, i) for i in range(job.num_tiles))

    def read(item) -> np.ndarray:
        j, i = item
        if i < 0:
            raise _Marker()
        return resize_tile(jobs[j].reader(i), encoder.input_size, encoder.interpolation)

    def settle(job: _SlideJob, bar) -> None:
        """After the last tile of a slide: commit it (or drop it if a tile failed), release its file handle."""
        job.close_reader()
        if job.error is None:
            job.open(encoder)  # an empty, complete file for a slide without tissue tiles
            job.commit()
            report.done.append((job.slide, job.seen))
            log.info("%s: %d tiles -> %s", job.slide, job.seen, job.target)
        bar.set_postfix_str(f"{len(report.done)}/{len(jobs)} slides done, {len(report.failed)} failed")

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
                out_file = job.open(encoder)
                out_file.append("features", feats[rs])
                out_file.append("coords", job.plan.coords[[batch.items[r][1] for r in rs]])
            if job.plan_error is not None or job.seen == job.num_tiles:
                settle(job, bar)

    with _bar(0, "tiles", loader.progress) as bar:  # the total grows as slides are tiled
        batches = prefetch_batches(items(), read, encoder.batch_size, workers=loader.workers, depth=loader.depth,
                                   skip=(Exception,))
        try:
            with contextlib.closing(batches):
                for batch, feats in encode_stream(encoder, batches):
                    route(batch, feats, bar)
        finally:
            for job in jobs:  # the reader threads have stopped here: every handle can be closed
                job.abort()
                job.close_reader()
    report.seconds = time.perf_counter() - start
    return report
