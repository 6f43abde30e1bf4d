"""Tile sources over a built index (`gpfm-index build`): open in milliseconds at any size, pickle as a folder name.

They return exactly the records of the in-memory sources they replace for the same tiles (`IndexSource` /
`FolderSource` for kind "files", `SlideTileSource` for kind "slides"), in the same order, so the pipeline's shuffling,
augmentation seeds, bad-record substitutions and iterator checkpoints are unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_jax.data import slides as slides_lib
from gpfm_jax.data.index.store import TileIndex
from gpfm_jax.data.sources import BadImageError, read_image_file


def _open(folder: str | os.PathLike, kind: str) -> TileIndex:
    index = TileIndex(folder)
    if index.kind != kind:
        want = "gpfm-index build --json/--folder" if kind == "files" else "gpfm-index build --slides"
        raise ValueError(f"{folder} is a {index.kind!r} index; this source needs a {kind!r} index ({want})")
    return index


class TileIndexSource:
    """Image files listed by a "files" index: {"image": uint8 [H, W, 3], "path": str}.

    Paths are `root / slide dir / tile name`; root defaults to the one recorded at build time (the JSON's folder or
    --root, the tile folder), and can be changed when the tiles have moved.
    """

    def __init__(self, folder: str | os.PathLike, root: str | os.PathLike | None = None):
        self.index = _open(folder, "files")
        self.root = str(root) if root else self.index.manifest["root"]
        self.origin = str(folder)
        self._prefixes: dict[int, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_prefixes": {}}

    def __len__(self) -> int:
        return self.index.num_tiles

    def _prefix(self, s: int) -> str:
        """str(Path(root) / slide dir) with a trailing separator, cached (a few thousand slides at a time)."""
        p = self._prefixes.get(s)
        if p is None:
            if len(self._prefixes) >= 4096:
                self._prefixes.clear()
            p = str(Path(self.root) / self.index.slide_name(s))
            p = self._prefixes[s] = p if p.endswith("/") else p + "/"
        return p

    def path(self, index: int) -> str:
        """str(Path(root) / slide dir / tile name), as IndexSource / FolderSource spell it (pathlib normalises;
        a plain file name needs no normalising, so it is appended as a string)."""
        s = self.index.slide_of(index)
        name = self.index.tile_name(index, s)
        if "/" in name or name in ("", "."):
            return str(Path(self._prefix(s)) / name)
        return self._prefix(s) + name

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.path(index)
        return {"image": read_image_file(p), "path": p}

    def __repr__(self) -> str:
        return f"TileIndexSource({self.origin!r}, n={len(self)})"


class SlideIndexSource:
    """Tissue tiles of the slides in a "slides" index, read through a bounded per-process LRU of open slides.

    Records: {"image", "path": "<slide>@x,y", "coords": int64 [2] level-0 (x, y), "slide": row of the slide table}.
    `handles` bounds the open slides per process, `cache_mb` their shared openslide tile cache.
    """

    def __init__(self, folder: str | os.PathLike, *, handles: int = 256, cache_mb: float = 64.0):
        self.index = _open(folder, "slides")
        self.tile_size = int(self.index.manifest["tile_size"])
        self.handles = slides_lib.SlideHandles(handles, cache_mb)
        self.origin = str(folder)

    def __len__(self) -> int:
        return self.index.num_tiles

    @property
    def num_slides(self) -> int:
        return self.index.num_slides

    def slide_path(self, s: int) -> str:
        return self.index.slide_name(s)

    def position(self, index: int) -> tuple[int, int, int, int]:
        """(slide, level-0 x, level-0 y, level-0 footprint) of tile `index`, without reading it."""
        s = self.index.slide_of(index)
        x, y = (int(v) for v in self.index.rows("coords", index, index + 1)[0])
        return s, x, y, int(self.index.array("level0_size")[s])

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, x, y, span = self.position(index)
        slide_path = self.index.slide_name(s)
        path = f"{slide_path}@{x},{y}"
        downs = tuple(float(d) for d in self.index.array("level_downsamples")[s, : self.index.array("num_levels")[s]])
        try:
            with self.handles.open(slide_path) as slide:
                img = slides_lib.read_tile(slide, x, y, span, self.tile_size, downs)
        except Exception as e:  # openslide raises on corrupt tiles and unreadable files
            raise BadImageError(path, f"{type(e).__name__}: {e}") from None
        return {"image": img, "path": path, "coords": np.array([x, y], np.int64), "slide": s}

    def __repr__(self) -> str:
        return f"SlideIndexSource({self.origin!r}, n={len(self)}, slides={self.num_slides})"
