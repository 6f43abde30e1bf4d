"""Whole-slide access for extraction, behind two small functions so the backend can change in one place.

Today it delegates to gpfm_jax.data.slides (openslide; tissue = Otsu on thumbnail saturation; coords are level-0
(x, y) of each tile's top-left corner, CLAM's convention). A tile of `tile_size` pixels at `magnification` spans
tile_size * base_magnification / magnification level-0 pixels and is read at the best pyramid level.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from gpfm_jax.data import slides as slides_lib


@dataclasses.dataclass(frozen=True)
class TilingOptions:
    tile_size: int = 256  # pixels at `magnification`; 256 at 20x covers the same 128 um as GPFM's 512 at 40x
    magnification: float = 20.0
    stride: int | None = None  # pixels at `magnification`; None = tile_size (no overlap)
    min_tissue: float = 0.5  # fraction of the tile footprint that must be tissue
    default_magnification: float | None = None  # for files that state neither objective power nor mpp
    cache_dir: str | None = None  # tissue grids cached here (per slide + options)


@dataclasses.dataclass(frozen=True)
class SlidePlan:
    """Which tiles of one slide are extracted, and the facts recorded next to their features."""

    path: str
    coords: np.ndarray  # int64 [N, 2] level-0 (x, y)
    tile_size: int
    magnification: float
    level0_tile_size: int  # level-0 pixels one tile spans
    base_magnification: float
    mpp: float | None  # level-0 microns per pixel
    width: int
    height: int
    _grid: object

    def attrs(self) -> dict:
        tile_mpp = self.mpp * self.level0_tile_size / self.tile_size if self.mpp else math.nan
        return {"slide": str(Path(self.path).absolute()), "slide_id": Path(self.path).stem, "tile_size": self.tile_size,
                "magnification": self.magnification, "level0_tile_size": self.level0_tile_size,
                "base_magnification": self.base_magnification, "mpp": self.mpp if self.mpp else math.nan,
                "tile_mpp": tile_mpp, "slide_width": self.width, "slide_height": self.height,
                "num_tiles": int(len(self.coords))}


def plan_slide(path: str | os.PathLike, opts: TilingOptions) -> SlidePlan:
    """Tissue detection + tile grid. Raises FileNotFoundError / ValueError for slides openslide cannot use."""
    grid = slides_lib.tile_coordinates(
        path, opts.tile_size, opts.magnification, stride=opts.stride, min_tissue=opts.min_tissue,
        default_magnification=opts.default_magnification, cache_dir=opts.cache_dir)
    info = grid.info
    return SlidePlan(str(path), np.asarray(grid.coords, np.int64).reshape(-1, 2), grid.tile_size,
                     float(grid.magnification), int(grid.level0_size), float(info.base_magnification), info.mpp,
                     info.width, info.height, grid)


class SlideReader:
    """Reads the plan's tiles as uint8 [tile_size, tile_size, 3]; safe to call from several threads (openslide is
    thread-safe and its ctypes calls release the GIL)."""

    def __init__(self, plan: SlidePlan):
        self.plan = plan
        self._slide = slides_lib.open_slide(plan.path)

    def __call__(self, index: int) -> np.ndarray:
        return slides_lib.read_grid_tile(self._slide, self.plan._grid, int(index))

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
