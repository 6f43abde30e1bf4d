"""Where files live: local folders and object-store URLs behind one path type.

A TPU pod keeps its data and checkpoints in a Cloud Storage bucket (many GPU clusters in S3-compatible storage), so
every path that names data, a checkpoint, a bundle or a run output may be a URL. They all go through this module:
`resolve` turns what the user typed into an `etils.epath.Path` (local paths made absolute, `gs://` / `s3://` kept),
and the few operations that differ between a disk and a bucket live here, once:

- a missing bucket or a refused credential is found *before* anything compiles (`check_reachable`): epath's mkdir on
  a missing bucket can wait for minutes inside the client's retries;
- a bucket has no rename, so "write to a temporary name, then rename" becomes "write locally, upload whole": a single
  object PUT is atomic, a reader never sees half an object (`write_bytes_atomic`, `upload_file`);
- libraries that need a local file (openslide, HDF5, array_record's writer) get one through `local_copy` /
  `download_file`;
- free disk space only means something on a disk (`free_bytes` is None for a URL).

The clients are the ones epath uses (gcsfs / s3fs through fsspec). An emulator is reached through the usual
variables (`STORAGE_EMULATOR_HOST` for gcsfs, `AWS_ENDPOINT_URL` for s3fs); see docs/storage.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Iterator, Union

from etils import epath

URL_SCHEMES = ("gs://", "s3://")
PathLike = Union[str, os.PathLike, epath.Path]
_CHUNK = 16 << 20


class StorageError(ValueError):
    """A path that cannot be used: missing bucket, no permission, unreachable endpoint, unsupported scheme. Its
    message is one line naming the path. A ValueError: the commands already turn bad values into one line."""


def is_url(path: PathLike) -> bool:
    return str(path).startswith(URL_SCHEMES)


def scheme(path: PathLike) -> str:
    """'gs', 's3' or 'file'."""
    text = str(path)
    return text.split("://", 1)[0] if is_url(text) else "file"


def resolve(path: PathLike) -> epath.Path:
    """The path as an epath.Path: a URL as given (a trailing slash dropped), a local path absolute (so an index or a
    config written from one folder reads the same from another)."""
    text = os.fspath(path) if not isinstance(path, str) else path
    if is_url(text):
        return epath.Path(text.rstrip("/") if text.count("/") > 2 else text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def bucket_of(path: PathLike) -> str:
    """The bucket of a URL: 'gs://bucket/a/b' -> 'bucket'."""
    return str(path).split("://", 1)[1].split("/", 1)[0]


def _filesystem(path: PathLike):
    """The fsspec client epath uses for `path` (one cached instance per scheme)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs(os.fspath(path))


def refresh(path: PathLike) -> None:
    """Forgets the client's cached listings (fsspec keeps them): what another process or host wrote since is seen."""
    if is_url(path):
        _filesystem(path).invalidate_cache()


def check_reachable(path: PathLike, timeout_s: float = 60.0) -> None:
    """Raises StorageError (one line) if `path` is a URL whose bucket does not exist, cannot be listed with the
    credentials at hand, or does not answer within `timeout_s` (the clients retry an unreachable endpoint for
    minutes). Local paths pass (their own errors are clear). Cheap: one metadata request."""
    if not is_url(path):
        return
    bucket = bucket_of(path)
    answer: dict[str, object] = {}

    def ask() -> None:
        try:
            import fsspec

            fs = fsspec.filesystem(scheme(path), skip_instance_cache=True)  # the endpoint as configured now
            answer["found"] = fs.exists(bucket)
            refresh(path)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            answer["error"] = e

    worker = threading.Thread(target=ask, name="gpfm-storage-check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise StorageError(f"{path}: no answer from the {scheme(path)}:// endpoint within {timeout_s:.0f} s "
                           f"(network, endpoint setting or credentials)")
    error = answer.get("error")
    if isinstance(error, ImportError):
        raise StorageError(f"{path}: no client for {scheme(path)}:// ({error}); pip install gcsfs / s3fs")
    if error is not None:
        raise StorageError(f"{path}: cannot reach bucket '{bucket}' ({type(error).__name__}: {_first_line(error)})")
    if not answer.get("found"):
        raise StorageError(f"{path}: bucket '{bucket}' does not exist or these credentials cannot see it")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def disk_usage(path: PathLike) -> tuple[shutil._ntuple_diskusage, str]:
    """(shutil.disk_usage, the folder measured) for the disk that holds local `path` (its nearest existing
    parent: the target of a save may not exist yet)."""
    if is_url(path):
        raise ValueError(f"{path}: a bucket has no disk usage")
    probe = os.path.abspath(os.fspath(path))
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return shutil.disk_usage(probe), probe


def free_bytes(path: PathLike) -> int | None:
    """Free space on the disk that holds `path`; None for a URL (a bucket has no 'disk full' to check ahead of a
    save)."""
    return None if is_url(path) else disk_usage(path)[0].free


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Writes `data` so that a reader sees the old content or the new, never a half: locally a temporary file in the
    same folder renamed over the target; on a bucket one PUT (atomic by the store's contract)."""
    target = resolve(path)
    if is_url(target):
        target.write_bytes(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.fspath(target))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def _copy_stream(src: epath.Path, dst: epath.Path) -> None:
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def upload_file(local: PathLike, remote: PathLike) -> None:
    """Copies a finished local file to `remote` whole (a URL: one object written at once; a local target: temporary
    name + rename), so nobody sees a partial file."""
    src, dst = resolve(local), resolve(remote)
    if is_url(dst):
        _copy_stream(src, dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.upload.tmp"
    _copy_stream(src, tmp)
    os.replace(os.fspath(tmp), os.fspath(dst))


def download_file(remote: PathLike, local: PathLike) -> None:
    """Copies `remote` to the local path `local` (temporary name + rename: an interrupted download leaves no file
    that looks complete)."""
    src, dst = resolve(remote), resolve(local)
    if is_url(dst):
        raise ValueError(f"{local}: download target must be a local path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.download.tmp"
    try:
        _copy_stream(src, tmp)
        os.replace(os.fspath(tmp), os.fspath(dst))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.fspath(tmp))
        raise


@contextlib.contextmanager
def local_copy(path: PathLike, workdir: PathLike | None = None) -> Iterator[epath.Path]:
    """A local file with the content of `path`: the path itself when it is local, else a downloaded copy that is
    deleted on exit (for readers that need a file name: openslide, HDF5)."""
    if not is_url(path):
        yield resolve(path)
        return
    folder = tempfile.mkdtemp(prefix="gpfm-dl-", dir=os.fspath(workdir) if workdir else None)
    try:
        local = epath.Path(folder) / resolve(path).name
        download_file(path, local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _files_under(root: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
    for item in sorted(root.iterdir(), key=lambda p: p.name):
        rel = f"{prefix}{item.name}"
        if item.is_dir():
            yield from _files_under(item, rel + "/")
        else:
            yield rel, item


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copies the folder `src` to `dst` (either side local or a URL), file by file (a bucket allows no recursive
    glob: one listing per folder)."""
    dst_root = resolve(dst)
    for rel, item in _files_under(resolve(src)):
        target = dst_root / rel
        if not is_url(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        _copy_stream(item, target)
