"""`gpfm-index pack`: a built index's tiles into ArrayRecord shards (local folder or gs://), resumable.

Why: a bucket serves a few thousand object reads per second to start with, while 8 chips need ~2,000 tiles per
second per host, every host at once; one GET per tile does not scale to 190M tiles. Packed shards are read in large
objects, and a process opens them in milliseconds (see packed.py for the layout and the reader).

- "files" index: each record is the tile file's bytes as they are on disk (no re-encode: the training decoder sees
  exactly what it would have read from the file). A file that cannot be read is packed as an empty record, which the
  reader reports as a bad tile like the missing file, so substitutions stay the same; they are counted.
- "slides" index: a tile has no file of its own; it is read from its slide as training would read it and encoded
  losslessly as PNG (manifest "encoding": "png"), so the decoded pixels are the ones the slide reader returns.

Shards are closed when they reach `shard_mb` MB or `shard_records` records, in the index's tile order. array_record
writes local files only: each shard is written in a local scratch folder, then uploaded whole, then recorded in
`progress.json` in the output folder; a pack that was stopped starts again after the last recorded shard (same
index and arguments required). The manifest is written last: a folder without one is not a packed index.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator

from gpfm_jax import storage
from gpfm_jax.data.index.packed import FORMAT, MANIFEST, VERSION, check_readable, is_packed
from gpfm_jax.data.index.store import TileIndex

PROGRESS = "progress.json"
SHARD_NAME = "shard-{:05d}.array_record"
WRITER_OPTIONS = "group_size:1,uncompressed"
Report = Callable[[str], None]


def _tile_reader(index_dir: str, index: TileIndex, root: str | None) -> tuple[Callable[[int], bytes], str]:
    """(function tile number -> encoded bytes, encoding name)."""
    from gpfm_jax.data.index.sources import SlideIndexSource, TileIndexSource

    if index.kind == "files":
        source = TileIndexSource(index_dir, root)

        def read(i: int) -> bytes:
            try:
                with open(source.path(i), "rb") as f:
                    return f.read()
            except OSError:
                return b""  # read back as a bad tile, as the missing file would be

        return read, "original"
    source = SlideIndexSource(index_dir)

    def read_png(i: int) -> bytes:
        from PIL import Image

        try:
            img = source[i]["image"]
        except Exception:  # noqa: BLE001 - an unreadable region is a bad tile, as at training time
            return b""
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        return buf.getvalue()

    return read_png, "png"


def _ordered(fn: Callable[[int], bytes], start: int, stop: int, workers: int) -> Iterator[bytes]:
    """fn(i) for i in [start, stop), in order, computed by `workers` threads with a bounded look-ahead."""
    if workers <= 1:
        yield from map(fn, range(start, stop))
        return
    window = 8 * workers
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="gpfm-pack") as pool:
        pending = [pool.submit(fn, i) for i in range(start, min(stop, start + window))]
        nxt = start + len(pending)
        k = 0
        while k < len(pending):
            yield pending[k].result()
            pending[k] = None  # free the bytes
            k += 1
            if nxt < stop:
                pending.append(pool.submit(fn, nxt))
                nxt += 1


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _key(index: TileIndex, encoding: str, shard_mb: float, shard_records: int) -> str:
    """What a resumed pack must share with the stopped one."""
    blob = json.dumps({"index": index.manifest["arrays"], "encoding": encoding, "shard_mb": shard_mb,
                       "shard_records": shard_records}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def pack(index_dir: str | os.PathLike, out: storage.PathLike, *, shard_mb: float = 256.0,
         shard_records: int = 16384, workers: int = 8, root: str | None = None, overwrite: bool = False,
         report: Report | None = None) -> str:
    """Packs the tiles of the built index at `index_dir` into shards under `out`; returns the output URL/path."""
    if shard_mb <= 0 or shard_records < 1:
        raise ValueError(f"--shard-mb {shard_mb} and --shard-records {shard_records} must be positive")
    report = report or (lambda msg: None)
    index = TileIndex(index_dir)
    storage.check_reachable(out)
    out_path = storage.resolve(out)
    if storage.scheme(out) == "s3":  # writing works; say now that training cannot read it from there
        try:
            check_readable(out)
        except storage.StorageError as e:
            report(f"note: {e}")
    if is_packed(out_path):
        if not overwrite:
            raise FileExistsError(f"{out_path} already holds a packed index; choose another --out or --overwrite")
        (out_path / MANIFEST).unlink()
    read, encoding = _tile_reader(str(index_dir), index, root)
    key = _key(index, encoding, shard_mb, shard_records)
    progress_file = out_path / PROGRESS
    done: list[dict[str, Any]] = []
    if progress_file.exists():
        state = json.loads(progress_file.read_text())
        if state.get("key") != key and not overwrite:
            raise ValueError(f"{progress_file}: a stopped pack of another index or other shard sizes; delete the "
                             "folder or pass --overwrite")
        if state.get("key") == key:
            done = state["shards"]
            report(f"resuming after {len(done)} finished shards ({sum(s['records'] for s in done):,} records)")
    else:
        out_path.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    start = sum(s["records"] for s in done)
    limit = int(shard_mb * 1e6)
    if not storage.is_url(out):  # a killed pack's half-written shard (a URL output's is in the system's temp folder)
        for stale in out_path.glob(".gpfm-pack-*"):
            shutil.rmtree(os.fspath(stale), ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix=".gpfm-pack-", dir=None if storage.is_url(out) else os.fspath(out_path))
    from array_record.python.array_record_module import ArrayRecordWriter

    try:
        writer, local, records, nbytes, empty = None, "", 0, 0, 0
        for i, data in enumerate(_ordered(read, start, index.num_tiles, workers), start):
            if writer is None:
                local = os.path.join(scratch, SHARD_NAME.format(len(done)))
                writer = ArrayRecordWriter(local, WRITER_OPTIONS)
                records, nbytes, empty = 0, 0, 0
            writer.write(data)
            records, nbytes, empty = records + 1, nbytes + len(data), empty + (not data)
            if nbytes >= limit or records >= shard_records or i == index.num_tiles - 1:
                writer.close()
                writer = None
                name = SHARD_NAME.format(len(done))
                entry = {"file": name, "records": records, "bytes": os.path.getsize(local),
                         "sha256": _file_sha256(local), "empty_records": empty}
                if storage.is_url(out):
                    storage.upload_file(local, out_path / name)
                    os.unlink(local)
                else:  # the scratch folder is inside the output folder: a rename
                    os.replace(local, os.fspath(out_path / name))
                done.append(entry)
                storage.write_text_atomic(progress_file, json.dumps({"key": key, "shards": done}) + "\n")
                report(f"shard {len(done) - 1}: {i + 1:,} of {index.num_tiles:,} tiles ({time.time() - t0:.0f} s)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    names = {s["file"] for s in done}
    for old in out_path.glob("shard-*.array_record"):  # an overwritten pack's extra shards
        if old.name not in names:
            old.unlink()
    index_copy = out_path / "index"
    if index_copy.exists():
        storage.resolve(index_copy).rmtree() if storage.is_url(out) else shutil.rmtree(os.fspath(index_copy))
    storage.copy_tree(index_dir, index_copy)
    manifest = {"format": FORMAT, "version": VERSION, "num_records": index.num_tiles,
                "num_slides": index.num_slides, "encoding": encoding, "writer_options": WRITER_OPTIONS,
                "empty_records": sum(s["empty_records"] for s in done),
                "source": {"index": str(storage.resolve(index_dir)), "kind": index.kind,
                           "root": index.manifest.get("root") if root is None else root, "copy": "index"},
                "build": {"shard_mb": shard_mb, "shard_records": shard_records, "seconds": round(time.time() - t0, 1),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": os.uname().nodename},
                "shards": done}
    storage.write_text_atomic(out_path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    progress_file.unlink()
    return str(out_path)
