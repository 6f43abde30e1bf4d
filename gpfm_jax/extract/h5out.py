"""HDF5 output written under a temporary name and renamed when complete: a file with the final name is always
whole, so "the .h5 exists" is a safe resume test, and an interrupted run leaves at most a `.NAME.partial` file,
which the next run overwrites. A write that fails (a full disk, an I/O error) removes the partial file and raises
`OutputWriteError` naming the file and the free space; files finished before are untouched. Space for a file's
expected size is reserved up front (`reserve`), so a full disk is found before HDF5 writes anything.

A target on object storage (gs://, s3://) is written the same way into a local staging folder and uploaded whole
when complete (one object write: a reader sees the whole file or none); the local file is then deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gpfm_jax import storage


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _attr(value: Any) -> Any:
    return np.nan if value is None else value


_UNCLOSABLE: list = []


class OutputWriteError(OSError):
    """Writing an output file failed; the message names the file, the reason and the free space."""


def _free_space(path: Path) -> str:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = float(shutil.disk_usage(probe).free)
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            break
        free /= 1024
    return f"{free:.1f} {unit} free on the filesystem of {probe}"


def _free_space_is_zero(path: Path) -> bool:
    """HDF5 does not always pass errno through ("Can't write data"): an empty filesystem says it all."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < 64 * 1024
    except OSError:
        return False


def _no_space(err: BaseException) -> bool:
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def reserve_bytes(rows: int, row_bytes: int, chunk_rows: int = 512) -> int:
    """Disk space to set aside for `rows` rows of `row_bytes` (summed over the datasets) in chunks of `chunk_rows`:
    whole chunks, plus a generous allowance for HDF5's indexes and headers."""
    chunks = max(1, -(-rows // chunk_rows))
    return int(1.25 * chunks * chunk_rows * row_bytes) + 4096 * chunks + (64 << 10)


class AtomicH5:
    """Context manager: appendable datasets in a temp file; renamed to `path` on clean exit, deleted on error.

    `reserve`: bytes to allocate for the partial file before anything is written (`reserve_bytes`). HDF5 then
    writes into space it already owns, so a disk that is too full fails here, cleanly, instead of inside HDF5 (a
    file HDF5 fails to write can neither be closed nor freed safely: h5py then crashes the interpreter)."""

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any] | None = None, reserve: int = 0,
                 staging: str | os.PathLike | None = None):
        self.remote = storage.is_url(path)
        self.path = storage.resolve(path) if self.remote else Path(path)
        # a URL: a uniquely named local file (several processes may stage into one folder), uploaded on success
        self.tmp = (Path(staging or tempfile.gettempdir()) / f".{uuid.uuid4().hex}-{self.path.name}.partial"
                    if self.remote else partial_path(self.path))
        self.attrs = dict(attrs or {})
        self.reserve = int(reserve)
        self.file: h5py.File | None = None

    def __enter__(self) -> "AtomicH5":
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.file = h5py.File(self.tmp, "w")
            for k, v in self.attrs.items():
                self.file.attrs[k] = _attr(v)
            if self.reserve > 0:
                self.file.close()
                self.file = None
                fd = os.open(self.tmp, os.O_RDWR)
                try:  # HDF5 appends at its end-of-allocation, inside the reserved (larger) file; close trims it
                    os.posix_fallocate(fd, 0, os.fstat(fd).st_size + self.reserve)
                finally:
                    os.close(fd)
                self.file = h5py.File(self.tmp, "r+")
        except (OSError, RuntimeError) as err:  # h5py raises RuntimeError for a failed flush
            self._fail(err)
        return self

    def _fail(self, err: Exception) -> None:
        """Drops the partial file and raises OutputWriteError (full disk: says so, with the free space)."""
        f, self.file = self.file, None
        if f is not None:
            # HDF5 cannot close a file whose dirty metadata it cannot write, and its handles then crash the process
            # when freed: empty the partial file first (its blocks are freed, later writes land in a sparse file)
            with contextlib.suppress(OSError):
                os.truncate(self.tmp, 0)
            try:
                f.close()
            except Exception:  # noqa: BLE001 - the file is being discarded
                _UNCLOSABLE.append(f)  # never freed: freeing a half-closed HDF5 file can crash the interpreter
        self.tmp.unlink(missing_ok=True)
        reason = "no space left on the device" if _no_space(err) or _free_space_is_zero(self.tmp) else (
            f"{type(err).__name__}: {err}")
        error = OutputWriteError(f"writing {self.path} failed: {reason}; {_free_space(self.tmp)}; the partial file "
                                 f"was removed, files finished before are intact")
        error.errno = errno.ENOSPC if "no space" in reason else getattr(err, "errno", None) or errno.EIO
        raise error from err

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
        try:
            ds.resize(ds.shape[0] + n, axis=0)
            ds[-n:] = rows
        except (OSError, RuntimeError) as err:  # h5py raises RuntimeError for a failed flush
            _UNCLOSABLE.append(ds)  # see _fail
            self._fail(err)

    def set_attrs(self, **attrs: Any) -> None:
        for k, v in attrs.items():
            self.file.attrs[k] = _attr(v)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            f, self.file = self.file, None
            try:
                if f is not None:
                    f.close()
            finally:
                self.tmp.unlink(missing_ok=True)
            return
        try:
            self.file.close()
            self.file = None
            if self.remote:
                try:
                    storage.upload_file(self.tmp, self.path)
                finally:
                    self.tmp.unlink(missing_ok=True)
                return
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
        except (OSError, RuntimeError) as err:  # h5py raises RuntimeError for a failed flush
            self._fail(err)
