"""HDF5 output written under a temporary name and renamed when complete: a file with the final name is always
whole, so "the .h5 exists" is a safe resume test, and an interrupted run leaves at most a `.NAME.partial` file,
which the next run overwrites.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _attr(value: Any) -> Any:
    return np.nan if value is None else value


class AtomicH5:
    """Context manager: appendable datasets in a temp file; renamed to `path` on clean exit, deleted on error."""

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any] | None = None):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.attrs = dict(attrs or {})
        self.file: h5py.File | None = None

    def __enter__(self) -> "AtomicH5":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        for k, v in self.attrs.items():
            self.file.attrs[k] = _attr(v)
        return self

    def create(self, name: str, tail: tuple[int, ...], dtype, chunk_rows: int = 512,
               attrs: dict[str, Any] | None = None) -> None:
        ds = self.file.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype,
                                      chunks=(chunk_rows, *tail))
        for k, v in (attrs or {}).items():
            ds.attrs[k] = _attr(v)

    def append(self, name: str, rows) -> None:
        ds = self.file[name]
        n = len(rows)
        if n == 0:
            return
        ds.resize(ds.shape[0] + n, axis=0)
        ds[-n:] = rows

    def set_attrs(self, **attrs: Any) -> None:
        for k, v in attrs.items():
            self.file.attrs[k] = _attr(v)

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self.file = self.file, None
        try:
            f.close()
        finally:
            if exc_type is not None:
                self.tmp.unlink(missing_ok=True)
        if exc_type is None:
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
