"""The extraction loops: tiles -> one HDF5 file; slides -> one HDF5 file each, resumable, failures isolated.

Overlap: a thread pool reads and resizes batch k+1 (loader.prefetch_batches) while the device encodes batch k, and
the host copies batch k-1's features into the HDF5 file only after batch k has been dispatched.
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
from gpfm_jax.extract.h5out import AtomicH5
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
        out = encoder.dispatch(batch.tiles) if batch.positions else None
        if pending is not None:
            yield pending[0], _fetch(encoder, *pending)
        pending = (batch, out)
    if pending is not None:
        yield pending[0], _fetch(encoder, *pending)


def _fetch(encoder: FeatureEncoder, batch: Batch, out) -> np.ndarray:
    if out is None:
        return np.zeros((0, encoder.feature_dim), np.float32)
    return np.asarray(out)[: len(batch.positions)]


def _preprocessed(encoder: FeatureEncoder, read_raw: Callable[[object], np.ndarray]) -> Callable[[object], np.ndarray]:
    size, interp = encoder.input_size, encoder.interpolation
    return lambda item: resize_tile(read_raw(item), size, interp)


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
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
    with AtomicH5(out, attrs) as h5, _bar(len(tiles.paths), out.name, loader.progress) as bar:
        h5.create("features", (encoder.feature_dim,), np.float32)
        h5.create("paths", (), h5py.string_dtype())
        batches = prefetch_batches(tiles.paths, _preprocessed(encoder, read_image_file), encoder.batch_size,
                                   workers=loader.workers, depth=loader.depth, skip=(BadImageError,))
        with contextlib.closing(batches):  # on error: stop the reader threads now, not at garbage collection
            for batch, feats in encode_stream(encoder, batches):
                h5.append("features", feats)
                h5.append("paths", [os.path.relpath(tiles.paths[p], tiles.root) for p in batch.positions])
                for p, reason in batch.failures:
                    failed.append((tiles.paths[p], reason))
                    if len(failed) <= 5:
                        log.warning("unreadable tile skipped: %s", reason)
                written += len(batch.positions)
                bar.update(len(batch.positions) + len(batch.failures))
        if written == 0:
            raise ValueError(f"{tiles.origin}: none of the {len(tiles.paths)} tiles could be read")
        h5.create("failed_paths", (), h5py.string_dtype())
        h5.append("failed_paths", [p for p, _ in failed])
        h5.set_attrs(num_tiles=written, num_failed=len(failed))
    return TilesResult(out, written, failed, seconds=time.perf_counter() - start)


def extract_slide(encoder: FeatureEncoder, slide: str | os.PathLike, out: str | os.PathLike,
                  tiling: TilingOptions | None = None, loader: LoaderOptions | None = None) -> int:
    """One slide -> `out` (CLAM layout: `features` f32 [N, D], `coords` int64 [N, 2] level-0 (x, y) with
    coords.attrs patch_level = 0 and patch_size = level-0 span). Returns N. Any read error fails the slide."""
    tiling, loader = tiling or TilingOptions(), loader or LoaderOptions()
    plan = plan_slide(slide, tiling)
    n = len(plan.coords)
    if n == 0:
        log.warning("%s: no tissue tiles at %sx / %d px; writing an empty feature file", slide, plan.magnification,
                    plan.tile_size)
    attrs = {**encoder.attrs(), **plan.attrs(), "kind": "slide"}
    coords_attrs = {"patch_level": 0, "patch_size": plan.level0_tile_size, "tile_size": plan.tile_size,
                    "magnification": plan.magnification}
    with AtomicH5(out, attrs) as h5, SlideReader(plan) as reader, _bar(n, Path(slide).name, loader.progress) as bar:
        h5.create("features", (encoder.feature_dim,), np.float32)
        h5.create("coords", (2,), np.int64, attrs=coords_attrs)
        batches = prefetch_batches(range(n), _preprocessed(encoder, reader), encoder.batch_size,
                                   workers=loader.workers, depth=loader.depth)
        with contextlib.closing(batches):  # reader threads must stop before the slide handle is closed
            for batch, feats in encode_stream(encoder, batches):
                h5.append("features", feats)
                h5.append("coords", plan.coords[batch.positions])
                bar.update(len(batch.positions))
    return n


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
    """Every slide to its own file. A finished file is skipped (resume); a slide that fails is reported and the
    others go on; an interrupted slide leaves no file under its final name (it is redone next time)."""
    report = SlidesReport()
    start = time.perf_counter()
    for slide, target in zip(slides, slide_outputs(slides, out)):
        if target.exists():
            report.skipped.append(slide)
            log.info("%s: %s exists, skipped", slide, target)
            continue
        try:
            n = extract_slide(encoder, slide, target, tiling, loader)
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others
            reason = f"{type(e).__name__}: {e}"
            report.failed.append((slide, reason))
            log.error("%s: FAILED, skipped (%s)", slide, reason)
            continue
        report.done.append((slide, n))
        log.info("%s: %d tiles -> %s", slide, n, target)
    report.seconds = time.perf_counter() - start
    return report
