"""The on-disk tile index: a folder of flat arrays plus a manifest, opened by every process that reads it.

Why a folder of raw arrays: at the recipe's ~190M tiles a JSON index takes ~1 h and ~100 GB to load per process,
and a Python or pickled path array is copied into every grain worker (workers are spawned and sent the dataset).
Flat files cost nothing to open (per-slide arrays are memory-mapped, per-tile rows read with pread), are shared
through the page cache by all processes on a host, and a reader pickles as its folder name.

Layout (all arrays raw little-endian, shapes and dtypes in the manifest):

    manifest.json         format, version, kind, counts, the build's arguments, per-array bytes and sha256
    slide_names.bin       the slide table's names (tile folders, or slide file paths), UTF-8 (surrogateescape)
    slide_name_offsets    uint64 [S + 1]  byte offsets into slide_names.bin
    tile_starts           int64 [S + 1]   index of the first tile of each slide, in the index's tile order
    kind "files" (tiles are image files `root / slide name / tile name`):
      name_starts         int64 [S]       position of each slide's first name in the name arrays (file order)
      tile_name_offsets   uint64 [N + 1]  byte offsets into tile_names.bin (8 bytes per tile)
      tile_names.bin      the tile file names, concatenated
    kind "slides" (tiles are squares of whole-slide images):
      coords              int32 [N, 2]    level-0 (x, y) of each tile (8 bytes per tile)
      level0_size         int64 [S]       level-0 pixels a tile spans on each slide
      level_downsamples   float64 [S, L]  pyramid downsamples (0-padded to the deepest slide's L levels)

Writes are atomic: everything goes into a hidden sibling folder that is renamed to the target when the manifest is
written, so the target name never holds a half-written index; the reader refuses a folder without a manifest or whose
files do not have the sizes the manifest records.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT = "gpfm-index"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("files", "slides")


class IndexFormatError(ValueError):
    """A folder that is not a complete gpfm-index (missing manifest, wrong sizes, unknown version)."""


# ---------------------------------------------------------------------------------------------------------------
# Writing


class _HashedFile:
    """A buffered binary file that hashes (sha256) and counts what is written."""

    def __init__(self, path: Path):
        self.path = path
        self._f: BinaryIO = open(path, "wb", buffering=1 << 22)
        self._hash = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._hash.update(data)
        self.nbytes += len(data)

    def close(self) -> dict[str, Any]:
        self._f.close()
        return {"file": self.path.name, "bytes": self.nbytes, "sha256": self._hash.hexdigest()}


class ColumnWriter:
    """Appends rows of one dtype and row shape to a raw array file (chunks of any length)."""

    def __init__(self, path: Path, dtype: str, row_shape: tuple[int, ...] = ()):
        self._file = _HashedFile(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_shape = tuple(row_shape)
        self.rows = 0

    def append(self, rows: Any) -> None:
        arr = np.ascontiguousarray(rows, dtype=self.dtype).reshape((-1,) + self.row_shape)
        self._file.write(memoryview(arr).cast("B"))
        self.rows += arr.shape[0]

    def close(self) -> dict[str, Any]:
        return {**self._file.close(), "dtype": self.dtype.str, "shape": [self.rows, *self.row_shape]}


class BlobWriter:
    """Appends byte strings to one blob file; returns each string's start offset."""

    def __init__(self, path: Path):
        self._file = _HashedFile(path)

    @property
    def offset(self) -> int:
        return self._file.nbytes

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def close(self) -> dict[str, Any]:
        return {**self._file.close(), "dtype": "|u1", "shape": [self._file.nbytes]}


class IndexWriter:
    """Writes an index into a hidden temporary folder next to `out`; `commit()` writes the manifest and renames the
    folder to `out`. Used as a context manager, an exception removes the temporary folder and leaves `out` as it
    was. An existing `out` is refused unless overwrite=True (then it is replaced only at the commit)."""

    def __init__(self, out: str | os.PathLike, kind: str, overwrite: bool = False):
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} already exists; choose another --out or pass --overwrite")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.building-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.kind = kind
        self.overwrite = overwrite
        self._open: dict[str, ColumnWriter | BlobWriter] = {}
        self._done: dict[str, dict[str, Any]] = {}
        self._t0 = time.time()

    def column(self, name: str, dtype: str, row_shape: tuple[int, ...] = ()) -> ColumnWriter:
        self._open[name] = w = ColumnWriter(self.tmp / name, dtype, row_shape)
        return w

    def blob(self, name: str) -> BlobWriter:
        self._open[name] = w = BlobWriter(self.tmp / name)
        return w

    def array(self, name: str, values: Any, dtype: str) -> None:
        """A small array written in one go."""
        w = self.column(name, dtype, np.shape(values)[1:])
        w.append(values)

    def commit(self, counts: dict[str, int], build: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        arrays = {name: w.close() for name, w in self._open.items()}
        self._open.clear()
        manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, **counts,
                    "build": {**build, "seconds": round(time.time() - self._t0, 1),
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": os.uname().nodename},
                    **(extra or {}), "arrays": arrays}
        tmp_manifest = self.tmp / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp_manifest, self.tmp / MANIFEST)
        old = None
        if self.out.exists():
            if not self.overwrite:
                self.abort()
                raise FileExistsError(f"{self.out} appeared during the build (another process?); kept that one")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        for w in self._open.values():
            try:
                w.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# ---------------------------------------------------------------------------------------------------------------
# Reading


def is_index(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest, after checking that every array file is there with the size it records."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tile index folder not found: {folder}")
    mf = folder / MANIFEST
    if not mf.is_file():
        raise IndexFormatError(f"{folder} is not a gpfm-index (no {MANIFEST}); a build that was stopped leaves no "
                               "index behind: run `gpfm-index build` (again)")
    try:
        m = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{mf}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT or m.get("kind") not in KINDS:
        raise IndexFormatError(f"{mf}: not a gpfm-index manifest (format {m.get('format')!r}, kind {m.get('kind')!r})")
    if m.get("version") != VERSION:
        raise IndexFormatError(f"{mf}: index format version {m.get('version')}, this gpfm_jax reads {VERSION}; "
                               "rebuild it with this version's gpfm-index")
    for name, a in m["arrays"].items():
        p = folder / a["file"]
        size = p.stat().st_size if p.is_file() else None
        if size != a["bytes"]:
            raise IndexFormatError(f"{folder}: array file {a['file']} has {size} bytes, the manifest says "
                                   f"{a['bytes']} (a damaged copy?); rebuild the index or copy it again")
    return m


class TileIndex:
    """Read access to a built index, opened lazily in each process: per-slide arrays memory-mapped, per-tile rows read
    with pread (see `rows`).

    Pickles as (folder, manifest): a grain worker opens the files itself instead of receiving their contents.
    """

    def __init__(self, folder: str | os.PathLike, manifest: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        self.kind: str = self.manifest["kind"]
        self.num_tiles: int = int(self.manifest["num_tiles"])
        self.num_slides: int = int(self.manifest["num_slides"])
        self._maps: dict[str, np.ndarray] = {}
        self._fds: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["manifest"])

    def __len__(self) -> int:
        return self.num_tiles

    def array(self, name: str) -> np.ndarray:
        """The named array, memory-mapped read-only (an empty array for a zero-length file, which mmap refuses).
        For the per-slide arrays (and verification); per-tile reads go through `rows` / `read_string`."""
        a = self._maps.get(name)
        if a is None:
            spec = self.manifest["arrays"][name]
            shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
            if spec["bytes"] == 0:
                a = np.zeros(shape, dtype)
            else:  # a plain ndarray over an mmap: cheaper to index than np.memmap, and never pickled (see above)
                with open(self.folder / spec["file"], "rb") as f:
                    a = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=dtype).reshape(shape)
            self._maps[name] = a
        return a

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(self.folder / self.manifest["arrays"][name]["file"], os.O_RDONLY)
            kept = self._fds.setdefault(name, fd)  # another reader thread may have opened it meanwhile
            if kept != fd:
                os.close(fd)
            fd = kept
        return fd

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a per-tile array, read with pread. Why not the memory map: a worker reading random
        tiles of a 190M-tile index would map a page (and the kernel's fault-around neighbours, 64 KiB) per read,
        and its RSS would grow towards the index's size over a run; pread leaves the pages in the shared page cache
        and the process's memory flat."""
        spec = self.manifest["arrays"][name]
        dtype, row_shape = np.dtype(spec["dtype"]), tuple(spec["shape"][1:])
        row = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        data = os.pread(self._fd(name), (stop - start) * row, start * row)
        return np.frombuffer(data, dtype).reshape((stop - start,) + row_shape)

    def read_string(self, blob: str, offsets: str, k: int) -> str:
        """String k of a per-tile blob (pread, see `rows`)."""
        start, stop = (int(v) for v in self.rows(offsets, k, k + 2))
        return os.fsdecode(os.pread(self._fd(blob), stop - start, start)) if stop > start else ""

    def _string(self, blob: str, offsets: str, k: int) -> str:
        off = self.array(offsets)
        start, stop = int(off[k]), int(off[k + 1])
        return os.fsdecode(self.array(blob)[start:stop].tobytes())

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        self._maps.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):  # interpreter shutdown, or a half-built object
            pass

    def slide_of(self, index: int) -> int:
        """The slide (row of the slide table) holding tile `index`."""
        if not 0 <= index < self.num_tiles:
            raise IndexError(f"tile {index} out of range for {self.folder} ({self.num_tiles} tiles)")
        return int(np.searchsorted(self.array("tile_starts"), index, side="right")) - 1

    def slide_name(self, s: int) -> str:
        return self._string("slide_names.bin", "slide_name_offsets", s)

    def slide_tiles(self, s: int) -> tuple[int, int]:
        """[start, stop) of slide s's tiles in the index order."""
        t = self.array("tile_starts")
        return int(t[s]), int(t[s + 1])

    def tile_name(self, index: int, slide: int | None = None) -> str:
        """kind "files": the tile's file name (relative to its slide folder)."""
        s = self.slide_of(index) if slide is None else slide
        k = int(self.array("name_starts")[s]) + index - int(self.array("tile_starts")[s])
        return self.read_string("tile_names.bin", "tile_name_offsets", k)

    def verify_hashes(self) -> list[str]:
        """Names of the array files whose sha256 differs from the manifest's (reads every byte)."""
        bad = []
        for name, spec in self.manifest["arrays"].items():
            h = hashlib.sha256()
            with open(self.folder / spec["file"], "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            if h.hexdigest() != spec["sha256"]:
                bad.append(spec["file"])
        return bad

    def __repr__(self) -> str:
        return f"TileIndex({str(self.folder)!r}, kind={self.kind}, tiles={self.num_tiles}, slides={self.num_slides})"
