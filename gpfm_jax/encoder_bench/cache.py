"""Content addresses and the on-disk store of a benchmark run.

Everything computed is stored under a key that hashes what determines it, so a result is reused whenever its
inputs are unchanged and recomputed when one of them changes, whatever the names in the suite say:
- an encoder is the hash of its parameter arrays (and the architecture fields of its bundle JSON), not of its path:
  the same weights converted twice, or declared twice, are one encoder;
- a feature set is hash(encoder, feature output, compute dtype, preprocessing, [tiling], the input files' contents);
  slides are keyed one by one, so adding slides to a cohort extracts only the new ones;
- a cell (encoder x task) is hash(its feature keys, the label file's content, the task's protocol and seed).

Hashing a file reads it once; the hash is then remembered with the file's (size, mtime) in `hashes.json`, as git's
index does, so a second run reads no slide and no weight file. Files over 64 MiB (whole slides) are hashed by their
size and three 1 MiB windows (start, middle, end): an edit elsewhere in such a file is not seen.

Layout of the store (`gpfm-bench run --cache`, default `<out>/cache`):

    bundles/<key>/                 encoders converted on the fly from PyTorch / safetensors files
    features/<key>.h5              a tile set's features (gpfm-extract's tile layout)
    features/<key>/<slide>.h5      per-slide features (gpfm-extract's slide layout), one file per slide key
    hashes.json                    remembered file hashes
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_jax.evaluation.results import write_json_atomic

BIG_FILE = 64 << 20
WINDOW = 1 << 20


def digest(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (sorted keys): the key of anything described by a dict."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= BIG_FILE:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f"sampled:{size}".encode())
            for offset in (0, size // 2 - WINDOW // 2, size - WINDOW):
                f.seek(offset)
                h.update(f.read(WINDOW))
    return h.hexdigest()


def tree_sha(params: Any, meta: dict | None = None) -> str:
    """sha256 over a parameter tree's leaves (path, dtype, shape, bytes; sorted by path) and a meta dict."""
    import jax

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    if meta is not None:
        h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _signature(path: Path) -> list:
    """(relative path, size, mtime_ns) of a file, or of every file under a folder."""
    if path.is_file():
        st = path.stat()
        return [["", st.st_size, st.st_mtime_ns]]
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


class HashCache:
    """sha256 of files and folders, remembered by (path, what, size and mtime of every file)."""

    def __init__(self, file: Path):
        self.file = file
        self._lock = threading.Lock()
        try:
            self.table: dict[str, dict] = json.loads(file.read_text()) if file.is_file() else {}
        except (json.JSONDecodeError, OSError):
            self.table = {}  # a damaged cache only costs re-hashing
        self.dirty = False

    def get(self, path: str | os.PathLike, what: str, compute) -> str:
        if "://" in str(path):  # a bucket: no cheap (size, mtime) signature of every file; hash each run
            return compute(path)
        path = Path(path).absolute()
        key = f"{what}:{path}"
        sig = _signature(path)
        with self._lock:
            hit = self.table.get(key)
            if hit is not None and hit["sig"] == sig:
                return hit["sha"]
        sha = compute(path)
        with self._lock:
            self.table[key] = {"sig": sig, "sha": sha}
            self.dirty = True
        return sha

    def file_sha(self, path: str | os.PathLike) -> str:
        return self.get(path, "file", _file_sha)

    def save(self) -> None:
        with self._lock:
            if self.dirty:
                write_json_atomic(self.file, self.table)
                self.dirty = False


class Store:
    """Paths of the cache store (see the module docstring) and its hash cache."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.hashes = HashCache(self.root / "hashes.json")

    def bundle_dir(self, key: str) -> Path:
        return self.root / "bundles" / key

    def tile_features(self, key: str) -> Path:
        return self.root / "features" / f"{key}.h5"

    def slide_features_dir(self, key: str) -> Path:
        return self.root / "features" / key


def read_json(path: Path) -> dict | None:
    """A JSON record, or None when it is absent (a damaged one raises, naming the file)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged JSON ({e}); delete it to recompute") from None
