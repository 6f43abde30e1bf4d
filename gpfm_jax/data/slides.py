"""Whole-slide tiling through openslide: tissue detection, tile grid at a magnification, tiles read on demand.

Shared by the pretraining source (data.sources.SlideTileSource) and the feature-extraction tool. Coordinates are
level-0 pixel (x, y) of each tile's top-left corner, the convention of CLAM's HDF5 files. A tile of `tile_size`
pixels at `magnification` covers tile_size * base_magnification / magnification level-0 pixels.

Tissue: Otsu threshold on the HSV saturation of a thumbnail (background glass is unsaturated), with a floor so an
empty slide does not become "all tissue". Results are cached on disk keyed by (path, size, mtime, parameters) so each
slide is analysed once per parameter set.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

_MPP_AT_40X = 0.25  # microns per pixel conventionally taken as 40x (10 / mpp)


@dataclasses.dataclass(frozen=True)
class SlideInfo:
    path: str
    width: int  # level 0
    height: int
    level_downsamples: tuple[float, ...]
    mpp: float | None  # microns per level-0 pixel (x), None if the file does not say
    base_magnification: float  # objective power of level 0


def open_slide(path: str | os.PathLike):
    """openslide.OpenSlide with a clear error naming the path."""
    import openslide

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"slide file not found: {p}")
    try:
        return openslide.OpenSlide(str(p))
    except openslide.OpenSlideError as e:  # also raised for unsupported formats
        raise ValueError(f"openslide cannot read slide {p}: {e}") from e


def slide_info(slide, path: str = "", default_magnification: float | None = None) -> SlideInfo:
    """Level-0 size, mpp and objective power; magnification falls back to 10/mpp, then to default_magnification."""
    props = slide.properties
    mpp = props.get("openslide.mpp-x")
    mpp = float(mpp) if mpp else None
    mag = props.get("openslide.objective-power")
    if mag:
        base = float(mag)
    elif mpp:
        base = round(10.0 / mpp, 1)
    elif default_magnification is not None:
        base = float(default_magnification)
    else:
        raise ValueError(f"slide {path} has neither objective power nor mpp; pass default_magnification")
    w, h = slide.dimensions
    return SlideInfo(str(path), int(w), int(h), tuple(float(d) for d in slide.level_downsamples), mpp, base)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = (mu_t * omega - mu) ** 2 / (omega * (1.0 - omega))
    sigma_b = np.nan_to_num(sigma_b, nan=0.0, posinf=0.0)
    return float(np.argmax(sigma_b))


def tissue_mask(thumbnail: Image.Image, min_saturation: int = 15) -> np.ndarray:
    """bool[h, w]: saturation above max(Otsu threshold, min_saturation) on an RGB(A) thumbnail."""
    rgb = thumbnail.convert("RGB")
    sat = np.asarray(rgb.convert("HSV"))[..., 1]
    thr = max(otsu_threshold(sat), float(min_saturation))
    return sat > thr


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The tiles of one slide: level-0 coordinates plus what it takes to read them back."""

    info: SlideInfo
    coords: np.ndarray  # int64 [N, 2] level-0 (x, y)
    tile_size: int  # output pixels
    magnification: float
    level0_size: int  # level-0 pixels a tile spans


def _cache_key(path: Path, params: dict) -> str:
    st = path.stat()
    blob = json.dumps({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **params},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def tile_coordinates(
    slide_path: str | os.PathLike,
    tile_size: int = 224,
    magnification: float = 20.0,
    *,
    stride: int | None = None,
    min_tissue: float = 0.5,
    thumbnail_max: int = 2048,
    min_saturation: int = 15,
    default_magnification: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> TileGrid:
    """Tissue tiles of a slide on a regular grid at `magnification`; coords (N, 2) are level-0 (x, y).

    stride is in output pixels (default tile_size: no overlap). A tile is kept when at least `min_tissue` of its
    footprint on the thumbnail is tissue. With cache_dir, the grid is stored as .npz and reused.
    """
    path = Path(slide_path)
    if not path.is_file():
        raise FileNotFoundError(f"slide file not found: {path}")
    stride = tile_size if stride is None else stride
    params = dict(tile_size=tile_size, magnification=magnification, stride=stride, min_tissue=min_tissue,
                  thumbnail_max=thumbnail_max, min_saturation=min_saturation,
                  default_magnification=default_magnification, version=1)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{path.stem}-{_cache_key(path, params)}.npz"
        if cache_file.is_file():
            z = np.load(cache_file, allow_pickle=False)
            info = SlideInfo(**json.loads(str(z["info"])))
            info = dataclasses.replace(info, level_downsamples=tuple(info.level_downsamples))
            return TileGrid(info, z["coords"], tile_size, magnification, int(z["level0_size"]))

    slide = open_slide(path)
    try:
        info = slide_info(slide, str(path), default_magnification)
        if magnification > info.base_magnification * 1.0001:
            raise ValueError(f"slide {path} is scanned at {info.base_magnification}x; cannot tile at {magnification}x")
        factor = info.base_magnification / magnification
        span = int(round(tile_size * factor))
        step = int(round(stride * factor))
        thumb = slide.get_thumbnail((thumbnail_max, thumbnail_max))
    finally:
        slide.close()
    mask = tissue_mask(thumb, min_saturation)
    sx, sy = thumb.width / info.width, thumb.height / info.height  # thumbnail px per level-0 px
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    xs = np.arange(0, info.width - span + 1, step, dtype=np.int64)
    ys = np.arange(0, info.height - span + 1, step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    x0 = np.clip(np.floor(gx * sx).astype(np.int64), 0, mask.shape[1])
    x1 = np.clip(np.maximum(np.ceil((gx + span) * sx).astype(np.int64), x0 + 1), 0, mask.shape[1])
    y0 = np.clip(np.floor(gy * sy).astype(np.int64), 0, mask.shape[0])
    y1 = np.clip(np.maximum(np.ceil((gy + span) * sy).astype(np.int64), y0 + 1), 0, mask.shape[0])
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    keep = tissue / area >= min_tissue
    coords = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64).reshape(-1, 2)
    grid = TileGrid(info, coords, tile_size, magnification, span)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, coords=coords, level0_size=span, info=json.dumps(dataclasses.asdict(info)))
        os.replace(tmp, cache_file)
    return grid


def best_level(level_downsamples: tuple[float, ...], factor: float) -> int:
    """The coarsest level whose downsample does not exceed `factor` (so we only ever downscale)."""
    best = 0
    for i, d in enumerate(level_downsamples):
        if d <= factor * 1.0001:
            best = i if d >= level_downsamples[best] else best
    return best


def read_tile(slide, x: int, y: int, level0_size: int, tile_size: int,
              level_downsamples: tuple[float, ...] | None = None) -> np.ndarray:
    """uint8 [tile_size, tile_size, 3] RGB of the level-0 square (x, y, level0_size), read at the best level.

    Transparent (out-of-slide) pixels become white, as on glass. Resampling is PIL bicubic.
    """
    downs = tuple(slide.level_downsamples) if level_downsamples is None else level_downsamples
    level = best_level(downs, level0_size / tile_size)
    size = int(math.ceil(level0_size / downs[level]))
    region = slide.read_region((int(x), int(y)), level, (size, size))
    if region.mode == "RGBA":
        bg = Image.new("RGB", region.size, (255, 255, 255))
        bg.paste(region, mask=region.getchannel("A"))
        region = bg
    elif region.mode != "RGB":
        region = region.convert("RGB")
    if region.size != (tile_size, tile_size):
        region = region.resize((tile_size, tile_size), Image.BICUBIC)
    return np.asarray(region)


def read_grid_tile(slide, grid: TileGrid, i: int) -> np.ndarray:
    """Tile i of a TileGrid."""
    x, y = grid.coords[i]
    return read_tile(slide, int(x), int(y), grid.level0_size, grid.tile_size, grid.info.level_downsamples)


class SlideHandles:
    """The open slides of one process: at most `capacity` handles (least recently used closed first) sharing one
    openslide tile cache of `cache_mb` MiB.

    Why: a training worker reads random tiles of tens of thousands of slides. Keeping every slide it touched open
    would hold one handle and one tile cache (openslide's default: up to 32 MiB) per slide: 1,000 slides, 4,000
    random reads took 3.1 GB. With one shared cache the same 1,000 open handles took ~25-90 KB each (measured,
    docs/data.md); the LRU bounds their number. Opening a slide costs ~4-7 ms of CPU, so under uniformly random
    reads over many more slides than `capacity` most reads pay it whatever the size. A handle in use by a reader
    thread is never closed under it: eviction marks it and the last user closes it. Pickles as its two sizes
    (handles belong to the process that opened them; a forked child starts empty).
    """

    def __init__(self, capacity: int = 256, cache_mb: float = 64.0):
        if capacity < 1:
            raise ValueError(f"slide handle capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.cache_mb = float(cache_mb)
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[str, list] = collections.OrderedDict()  # path -> [slide, users, evicted]
        self._cache = None
        self._pid = os.getpid()
        self.opened = 0  # opens in this process (a metric for tests and benchmarks)

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "cache_mb": self.cache_mb}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __len__(self) -> int:
        return len(self._open)

    def _new_handle(self, path: str):
        slide = open_slide(path)
        if self.cache_mb > 0 and hasattr(slide, "set_cache"):
            import openslide

            if self._cache is None:
                self._cache = openslide.OpenSlideCache(int(self.cache_mb * (1 << 20)))
            slide.set_cache(self._cache)
        return slide

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[Any]:
        """The slide at `path`, opened if needed; the handle stays valid until the with-block ends."""
        if self._pid != os.getpid():  # forked: the parent's handles are not ours
            self._reset()
        with self._lock:
            entry = self._open.get(path)
            if entry is not None:
                self._open.move_to_end(path)
                entry[1] += 1
        if entry is None:
            slide = self._new_handle(path)  # outside the lock: opening takes milliseconds
            with self._lock:
                entry = self._open.get(path)
                if entry is None:
                    entry = self._open[path] = [slide, 1, False]
                    self.opened += 1
                    slide = None
                else:  # another thread opened it meanwhile
                    self._open.move_to_end(path)
                    entry[1] += 1
                self._evict()
            if slide is not None:
                slide.close()
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                close = entry[2] and entry[1] == 0
            if close:
                entry[0].close()

    def _evict(self) -> None:
        while len(self._open) > self.capacity:
            _, entry = self._open.popitem(last=False)
            entry[2] = True
            if entry[1] == 0:
                entry[0].close()

    def close(self) -> None:
        with self._lock:
            entries = list(self._open.values())
            self._open.clear()
        for entry in entries:
            entry[2] = True
            if entry[1] == 0:
                entry[0].close()
