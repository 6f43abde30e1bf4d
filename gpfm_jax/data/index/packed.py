"""Packed tiles (`gpfm-index pack`): reading a folder of ArrayRecord shards, local or on gs://.

Layout of a packed folder (written by pack.py):

    manifest.json             format "gpfm-packed", num_records, the shards in order (file, records, bytes, sha256),
                              how records are encoded, what was packed
    shard-00000.array_record  records [0, n0) in the index's tile order: each record is one tile's encoded image
    shard-00001.array_record  (group_size:1, uncompressed: one record per chunk, read back as the original bytes)
    ...
    index/                    a copy of the gpfm-index the tiles came from: record i is tile i of it (provenance)

Why per-shard readers and not one `grain.sources.ArrayRecordDataSource`: at the recipe's 190M tiles a reader with
array_record's default in-memory index keeps ~8 bytes per record of every shard it has opened (~1.5 GB per grain
worker once a shuffled epoch has touched them all). With `index_storage_option:offloaded` a reader keeps ~5.5 KB,
but grain's source keeps every reader it ever opened (one file descriptor each) and reads one record through
`read([i])`, whose cost grows with the records per shard (0.048 ms at 16k records, 0.37 ms at 60k; seek + read:
0.003-0.03 ms). Here readers are opened lazily from the manifest's
record counts (nothing is opened to learn a length), at most `max_open` stay open (LRU), and a record is read with
`seek(i); read()`. Offloaded readers cost a footer read per record that grows with the records per shard (measured:
0.04 ms at 4k records, 2.1 ms at 60k, local page cache): `gpfm-index pack --shard-records` keeps shards short. Small
packs (<= IN_MEMORY_MAX_RECORDS) keep the in-memory index, which is faster and costs at most a few MB.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from typing import Any

import numpy as np

from gpfm_jax import storage

FORMAT = "gpfm-packed"
VERSION = 1
MANIFEST = "manifest.json"
IN_MEMORY_MAX_RECORDS = 1 << 20  # 8 MB of offsets at most per process
_READER_BUFFER = 32768  # as grain's ArrayRecordDataSource


class PackedFormatError(ValueError):
    """A folder that is not a complete packed index, or one this version cannot read."""


def is_packed(path: storage.PathLike) -> bool:
    """True when `path` holds a packed index's manifest (one metadata request on a bucket)."""
    try:
        mf = storage.resolve(path) / MANIFEST
        return mf.is_file() and json.loads(mf.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_manifest(folder: storage.PathLike) -> dict[str, Any]:
    folder = storage.resolve(folder)
    mf = folder / MANIFEST
    try:
        text = mf.read_text()
    except FileNotFoundError:
        raise PackedFormatError(f"{folder} is not a packed index (no {MANIFEST}); a pack that was stopped leaves "
                                "none: run `gpfm-index pack` again, it resumes") from None
    try:
        m = json.loads(text)
    except ValueError as e:
        raise PackedFormatError(f"{mf}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT:
        raise PackedFormatError(f"{mf}: not a packed index (format {m.get('format')!r})")
    if m.get("version") != VERSION:
        raise PackedFormatError(f"{mf}: packed format version {m.get('version')}, this gpfm_jax reads {VERSION}")
    return m


def check_readable(folder: storage.PathLike) -> None:
    """array_record reads local files and gs:// only: an s3:// pack is refused here in one line."""
    if storage.scheme(folder) == "s3":
        raise storage.StorageError(
            f"{folder}: array_record cannot read s3:// (its reader opens local files and gs:// only); copy the "
            f"folder to a local disk (e.g. `aws s3 sync {folder} DIR`) and set data.path=DIR")


def default_max_open() -> int:
    """1,024 open shards, or a quarter of this process's file-descriptor limit where that is lower (a common soft
    limit is 1,024, shared with everything else a grain worker opens)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1024 if soft == resource.RLIM_INFINITY else max(16, min(1024, soft // 4))


def _reader(path: str, options: str):
    from array_record.python.array_record_module import ArrayRecordReader

    return ArrayRecordReader(path, options=f"readahead_buffer_size:0,max_parallelism:1,{options}",
                             file_reader_buffer_size=_READER_BUFFER)


class PackedSource:
    """The tiles of a packed folder: {"image": uint8 [H, W, 3], "path": "<folder>/<shard>#<position>"}, decoded by
    the same `decode_image` as the file sources, so the pipeline's batches are bit-identical to reading the files.

    index_storage: "in_memory" | "offloaded" | "auto" (in memory up to IN_MEMORY_MAX_RECORDS records); max_open: the
    readers kept open (default_max_open). Pickles as its folder and manifest: a grain worker opens its own readers.
    """

    def __init__(self, folder: storage.PathLike, manifest: dict[str, Any] | None = None, *,
                 index_storage: str = "auto", max_open: int | None = None):
        check_readable(folder)
        self.folder = str(storage.resolve(folder))
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        shards = self.manifest["shards"]
        self._files = [f"{self.folder}/{s['file']}" for s in shards]
        self._starts = np.concatenate([[0], np.cumsum([s["records"] for s in shards], dtype=np.int64)])
        if index_storage == "auto":
            index_storage = "in_memory" if self._starts[-1] <= IN_MEMORY_MAX_RECORDS else "offloaded"
        if index_storage not in ("in_memory", "offloaded"):
            raise ValueError(f"index_storage={index_storage!r}: expected auto, in_memory or offloaded")
        self.index_storage = index_storage
        self._options = ("index_storage_option:offloaded,footer_prefetch_bytes:0" if index_storage == "offloaded"
                         else "")
        self.max_open = int(max_open) if max_open is not None else default_max_open()
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[int, tuple[Any, threading.Lock]] = collections.OrderedDict()
        self.opened = 0  # readers opened by this process (tests, benchmarks)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "manifest": self.manifest, "index_storage": self.index_storage,
                "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["manifest"], index_storage=state["index_storage"],
                      max_open=state["max_open"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, position in the shard) of record `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {self.folder} ({len(self)} records)")
        s = int(np.searchsorted(self._starts, index, side="right")) - 1
        return s, index - int(self._starts[s])

    def _shard(self, s: int) -> tuple[Any, threading.Lock]:
        with self._lock:
            entry = self._open.get(s)
            if entry is not None:
                self._open.move_to_end(s)
                return entry
        reader = _reader(self._files[s], self._options)  # outside the lock: opening reads the file's footer
        if not reader.ok():
            raise OSError(f"cannot open shard {self._files[s]}")
        with self._lock:
            entry = self._open.get(s)
            if entry is None:
                entry = self._open[s] = (reader, threading.Lock())
                self.opened += 1
                while len(self._open) > self.max_open:  # a reader in use keeps working: closed when released
                    self._open.popitem(last=False)
            else:
                reader.close()
        return entry

    def read_bytes(self, index: int) -> bytes:
        s, pos = self.locate(index)
        reader, lock = self._shard(s)
        with lock:  # seek + read on one reader is one operation
            reader.seek(pos)
            return reader.read()

    def num_open(self) -> int:
        return len(self._open)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from gpfm_jax.data.sources import BadImageError, decode_image

        s, pos = self.locate(index)
        path = f"{self._files[s]}#{pos}"
        try:
            data = self.read_bytes(index)
        except (OSError, RuntimeError, ValueError) as e:
            raise BadImageError(path, f"cannot read: {e}") from None
        return {"image": decode_image(data, path), "path": path}

    def __repr__(self) -> str:
        return f"PackedSource({self.folder!r}, n={len(self)}, shards={len(self._files)})"


def _sha256(path: storage.PathLike) -> str:
    h = hashlib.sha256()
    with storage.resolve(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: storage.PathLike, hashes: bool = True) -> list[str]:
    """One line per problem: a shard missing, with another size, record count or sha256 than the manifest's."""
    check_readable(folder)
    folder = storage.resolve(folder)
    m = read_manifest(folder)
    problems = []
    for s in m["shards"]:
        path = folder / s["file"]
        if not path.exists():
            problems.append(f"missing shard: {path}")
            continue
        size = path.stat().length
        if size != s["bytes"]:
            problems.append(f"shard {path}: {size} bytes, the manifest says {s['bytes']}")
            continue
        reader = _reader(str(path), "")
        count = reader.num_records() if reader.ok() else None
        reader.close()
        if count != s["records"]:
            problems.append(f"shard {path}: {count} records, the manifest says {s['records']}")
        elif hashes and _sha256(path) != s["sha256"]:
            problems.append(f"shard {path}: content hash differs from the manifest's (damaged copy?)")
    if sum(s["records"] for s in m["shards"]) != m["num_records"]:
        problems.append(f"{folder / MANIFEST}: shard record counts do not add up to num_records")
    return problems
