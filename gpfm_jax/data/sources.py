"""Random-access tile sources (grain RandomAccessDataSource protocol: __len__ / __getitem__).

Every source returns {"image": uint8 [H, W, 3] RGB, "path": str} and raises BadImageError for a record it cannot
decode; `RobustSource` turns those into deterministic substitutions plus a skip count, so one bad JPEG among
millions never stops a run, while a source that is all bad still fails loudly.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from gpfm_jax.data import slides as slides_lib
from gpfm_jax.data.batch import NUM_SKIPPED

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


class BadImageError(Exception):
    """A record whose bytes are missing, truncated, empty or not an image."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path = path


class TileSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, Any]: ...


def decode_image(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """Bytes -> uint8 [H, W, 3] RGB. Grayscale / palette / CMYK / RGBA are converted (alpha composited on white);
    anything PIL cannot fully decode (zero bytes, truncation, garbage) raises BadImageError."""
    if not data:
        raise BadImageError(path, "zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: truncated files fail here, not later in a worker
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                out = Image.new("RGB", rgba.size, (255, 255, 255))
                out.paste(rgba, mask=rgba.getchannel("A"))
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
                out = Image.fromarray(arr).convert("RGB")
            else:
                out = img.convert("RGB")
            arr = np.asarray(out)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError, EOFError) as e:
        raise BadImageError(path, f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImageError(path, f"unusable image shape {arr.shape}")
    return arr


def read_image_file(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(path, f"cannot read: {e}") from None
    return decode_image(data, path)


class FileListSource:
    """Tiles given as a list of file paths (the base of the folder and index sources)."""

    def __init__(self, paths: Sequence[str], origin: str):
        if len(paths) == 0:
            raise ValueError(f"no image files found in {origin}")
        # One numpy bytes array instead of millions of Python strings: small, and cheap to pickle to workers.
        self._paths = np.array([os.fsencode(p) for p in paths])
        self.origin = origin

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.path(index)
        return {"image": read_image_file(p), "path": p}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.origin!r}, n={len(self)})"


class FolderSource(FileListSource):
    """Every image file under `root` (recursive, sorted, so the order is the same on every host)."""

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"tile folder not found: {root}")
        exts = tuple(e.lower() for e in extensions)
        paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())
        super().__init__(paths, str(root))


# A JSON index above this size is refused: json.load plus one path per tile, in every process and every grain
# worker, costs ~13 s and ~0.6 GB per million tiles (measured, docs/data.md). gpfm-index builds a memory-mapped one.
MAX_JSON_INDEX_BYTES = 256 << 20


class IndexSource(FileListSource):
    """The official GPFM index: a JSON object {slide_dir: [tile file name, ...]}, for small sets (see
    MAX_JSON_INDEX_BYTES; the recipe's index goes through `gpfm-index build` and `data.index.TileIndexSource`).

    Relative slide_dirs are resolved against `root` (default: the JSON file's folder). Files are not stat'ed up
    front; a missing one is a bad record at read time. Order: slide dirs sorted, each dir's files in list order.
    """

    def __init__(self, index_file: str | os.PathLike, root: str | os.PathLike | None = None,
                 max_bytes: int | None = MAX_JSON_INDEX_BYTES):
        index_file = Path(index_file)
        if not index_file.is_file():
            raise FileNotFoundError(f"tile index not found: {index_file}")
        size = index_file.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise ValueError(
                f"tile index {index_file} is {size / 1e9:.2f} GB: too large to load as JSON in every process (minutes "
                f"and GBs each). Build a memory-mapped index once: `gpfm-index build --json {index_file} --out "
                f"INDEX_DIR`, then read INDEX_DIR instead (gpfm-train: data.path=INDEX_DIR)")
        with open(index_file) as f:
            index = json.load(f)
        if not isinstance(index, dict):
            raise ValueError(f"tile index {index_file} must be a JSON object {{slide_dir: [files]}}")
        base = Path(root) if root is not None else index_file.parent
        paths = [str(base / d / name) for d in sorted(index) for name in index[d]]
        if not paths:
            raise ValueError(f"tile index {index_file} lists no tiles")
        super().__init__(paths, str(index_file))


class TfdsSource:
    """A TFDS dataset read with tfds.data_source (ArrayRecord, no TensorFlow). Images are decoded here (PIL), not
    by TFDS, so bad bytes are skipped like bad files."""

    def __init__(self, name: str | None = None, *, split: str = "train", data_dir: str | None = None,
                 builder_dir: str | None = None, image_key: str = "image"):
        import tensorflow_datasets as tfds

        decoders = {image_key: tfds.decode.SkipDecoding()}
        if builder_dir is not None:
            builder = tfds.builder_from_directory(builder_dir)
            self._ds = builder.as_data_source(split=split, decoders=decoders)
            self.origin = f"{builder_dir}[{split}]"
        else:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
            self.origin = f"{name}[{split}]"
        self.image_key = image_key
        if len(self._ds) == 0:
            raise ValueError(f"TFDS dataset {self.origin} is empty")

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._ds[index]
        path = ex.get("path", f"{self.origin}#{index}")
        path = path.decode() if isinstance(path, bytes) else str(path)
        return {"image": decode_image(ex[self.image_key], path), "path": path}

    def __repr__(self) -> str:
        return f"TfdsSource({self.origin!r}, n={len(self)})"


class SlideTileSource:
    """Tissue tiles of whole-slide images, read on demand through openslide (grid cached via slides.tile_coordinates).

    For a few slides (tools, tests): every slide is tiled here, at construction, and the coordinates travel with the
    source into each grain worker. Many slides go through `gpfm-index build --slides` and `SlideIndexSource`, which
    returns the same records. Records add "coords" (level-0 x, y) and "slide" (index into slide_paths). Open slides
    live in a bounded per-process LRU (`handles`), so the source pickles cleanly into grain workers.
    """

    def __init__(self, slide_paths: Sequence[str | os.PathLike], tile_size: int = 224, magnification: float = 20.0,
                 *, cache_dir: str | os.PathLike | None = None, handles: int = 256, cache_mb: float = 64.0,
                 **tiling: Any):
        if not slide_paths:
            raise ValueError("SlideTileSource needs at least one slide")
        self.slide_paths = [str(p) for p in slide_paths]
        grids = [slides_lib.tile_coordinates(p, tile_size, magnification, cache_dir=cache_dir, **tiling)
                 for p in self.slide_paths]
        self._level0 = np.array([g.level0_size for g in grids])
        self._downs = [g.info.level_downsamples for g in grids]
        self.tile_size = tile_size
        counts = np.array([len(g.coords) for g in grids], np.int64)
        if counts.sum() == 0:
            raise ValueError(f"no tissue tiles found in slides {self.slide_paths}")
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._coords = np.concatenate([g.coords for g in grids]).reshape(-1, 2)
        self.handles = slides_lib.SlideHandles(handles, cache_mb)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def position(self, index: int) -> tuple[int, int, int, int]:
        """(slide index, level-0 x, level-0 y, level-0 footprint) of tile `index`, without reading it."""
        s = int(np.searchsorted(self._offsets, index, side="right") - 1)
        x, y = (int(v) for v in self._coords[index])
        return s, x, y, int(self._level0[s])

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, x, y, span = self.position(index)
        path = f"{self.slide_paths[s]}@{x},{y}"
        try:
            with self.handles.open(self.slide_paths[s]) as slide:
                img = slides_lib.read_tile(slide, x, y, span, self.tile_size, self._downs[s])
        except Exception as e:  # openslide raises on corrupt tiles
            raise BadImageError(path, f"{type(e).__name__}: {e}") from None
        return {"image": img, "path": path, "coords": np.array([x, y], np.int64), "slide": s}


_skips_logged = 0


def _warn_skip(e: BadImageError) -> None:
    """Log the first few skips of this process, then every 1000th: visible, but never a flood."""
    global _skips_logged
    _skips_logged += 1
    if _skips_logged <= 5 or _skips_logged % 1000 == 0:
        log.warning("skipping unreadable tile (%d so far in this process): %s", _skips_logged, e)


class RobustSource:
    """Wraps a source: a BadImageError at index i is replaced by the record at i + k*stride (k = 1, 2, ...), a pure
    function of i, so resumed runs see the same substitutions. The record gets NUM_SKIPPED = k.

    After `max_retries` consecutive bad records it raises, naming the source and the files tried: at that point
    the source is (almost) all bad and training on it would be meaningless.
    """

    _STRIDE = 1_000_003  # a prime: successive substitutes spread over the source

    def __init__(self, source: TileSource, max_retries: int = 32):
        if len(source) == 0:
            raise ValueError(f"empty source {source!r}")
        self.source = source
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.source)
        tried = []
        for k in range(min(self.max_retries, n) + 1):
            j = (index + k * self._STRIDE) % n
            try:
                rec = dict(self.source[j])
            except BadImageError as e:
                tried.append(str(e))
                _warn_skip(e)
                continue
            rec[NUM_SKIPPED] = k
            return rec
        raise RuntimeError(
            f"{len(tried)} consecutive unreadable records in {self.source!r} (is every file bad?); tried: "
            + "; ".join(tried[:5])
        )

    def __repr__(self) -> str:
        return f"RobustSource({self.source!r})"
