"""From what a user writes as a data path to a tile source: a built index, a JSON index, a folder, slide lists.

`tile_source` / `slide_source` are what gpfm-train's `data.source = "index" | "folder" | "slides"` call. A list of
slides (text file, glob, comma-separated paths, one slide) is tiled once into a slides index under `cache_dir`
(keyed by the slide paths, their sizes and mtimes and the tiling parameters; a file lock keeps processes sharing the
folder from building it twice), then read like any built index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from gpfm_jax.data.index import packed
from gpfm_jax.data.index.build_slides import LIST_EXTENSIONS, build_from_slides, read_slide_list
from gpfm_jax.data.index.sources import SlideIndexSource, TileIndexSource
from gpfm_jax.data.index.store import TileIndex, is_index


def tile_source(path: str | os.PathLike, root: str | os.PathLike | None = None):
    """A packed folder (local or gs://) -> PackedSource; a built "files" index folder -> TileIndexSource; a JSON file
    -> IndexSource (small sets only)."""
    from gpfm_jax import storage
    from gpfm_jax.data.sources import IndexSource

    if storage.is_url(path):
        packed.check_readable(path)
        storage.check_reachable(path)
        if not packed.is_packed(path):
            raise ValueError(f"{path}: no packed index there (no manifest.json of format {packed.FORMAT!r}); only "
                             "packed tiles are read from a bucket: `gpfm-index pack INDEX --out URL`")
        return packed.PackedSource(path)
    if packed.is_packed(path):
        return packed.PackedSource(path)
    p = Path(path)
    if p.is_dir():
        if not is_index(p):
            raise ValueError(f"{p} is a folder but not a gpfm-index (no manifest.json): build one with `gpfm-index "
                             f"build --json INDEX.json --out {p}`, or read a tile folder with data.source=folder")
        return TileIndexSource(p, root or None)
    return IndexSource(p, root=root or None)


def folder_source(path: str | os.PathLike):
    """A tile folder -> FolderSource (lists it in every process); a built index of one -> TileIndexSource."""
    from gpfm_jax.data.sources import FolderSource

    return TileIndexSource(path) if is_index(path) else FolderSource(path)


def slide_list(spec: str | os.PathLike) -> list[str]:
    """The slide paths `spec` names: a built slides index, a list file, a glob, comma-separated paths or one slide."""
    spec = str(spec)
    if is_index(spec):
        index = TileIndex(spec)
        if index.kind != "slides":
            raise ValueError(f"{spec} is a {index.kind!r} index, not a slides index")
        return [index.slide_name(s) for s in range(index.num_slides)]
    if "," in spec and not Path(spec).exists():
        return [s.strip() for s in spec.split(",") if s.strip()]
    return read_slide_list(spec)


def _key(paths: list[str], params: dict[str, Any]) -> str:
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append([st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append(None)
    blob = json.dumps({"paths": paths, "stats": stats, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def slide_source(spec: str | os.PathLike, *, tile_size: int = 224, magnification: float = 20.0,
                 min_tissue: float = 0.5, handles: int = 256, cache_mb: float = 64.0,
                 cache_dir: str | os.PathLike | None = None, workers: int = 0):
    """A built slides index -> SlideIndexSource; slides named any other way are tiled into `cache_dir` first
    (without a cache_dir: an in-memory SlideTileSource, tiled in this process)."""
    from gpfm_jax.data.sources import SlideTileSource

    if is_index(spec):
        source = SlideIndexSource(spec, handles=handles, cache_mb=cache_mb)
        built = source.index.manifest.get("build", {}).get("params", {})
        asked = {"tile_size": int(tile_size), "magnification": float(magnification), "min_tissue": float(min_tissue)}
        differ = {k: (built[k], v) for k, v in asked.items() if k in built and built[k] != v}
        if differ:  # the index's tiles are what they were built as: never train on other tiles than the config says
            raise ValueError(f"slides index {spec} was built with " + ", ".join(
                f"{k}={b} (config.data.{k}={a})" for k, (b, a) in differ.items())
                + "; set the config to the index's values or build another index")
        return source
    paths = slide_list(spec)
    if cache_dir is None:
        return SlideTileSource(paths, tile_size, magnification, min_tissue=min_tissue, handles=handles,
                               cache_mb=cache_mb)
    params = {"tile_size": int(tile_size), "magnification": float(magnification), "min_tissue": float(min_tissue)}
    out = Path(cache_dir) / f"slides-{_key(paths, params)}"
    with _locked(Path(cache_dir) / f"{out.name}.lock"):
        if not is_index(out):
            build_from_slides(paths, out, workers=workers, **params)
    return SlideIndexSource(out, handles=handles, cache_mb=cache_mb)


__all__ = ["tile_source", "folder_source", "slide_list", "slide_source", "LIST_EXTENSIONS"]
