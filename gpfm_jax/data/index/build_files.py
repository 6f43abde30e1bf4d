"""Building a "files" index (tiles are image files) from the official JSON index or from a folder of tiles.

The tile order is exactly that of the in-memory sources the index replaces, so a run reads the same tiles in the
same order, with the same substitutions and the same iterator checkpoints, from either:
  - JSON (`IndexSource`): slide folders in sorted order (Python string order), each folder's files in list order;
  - folder (`FolderSource`): every image file under the root, sorted by its full path string.

The JSON is parsed as a stream of events (ijson, C backend) and tile names go to disk in chunks, so peak memory is
bounded by the slide table (one name and three integers per slide), not by the file's size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from gpfm_jax.data.index.store import IndexWriter

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")  # = data.sources.IMAGE_EXTENSIONS
_CHUNK = 1 << 16  # names encoded and written per flush
Progress = Callable[[int], None]


class _Names:
    """The tile-name blob and its offsets, written in chunks."""

    def __init__(self, writer: IndexWriter):
        self.blob = writer.blob("tile_names.bin")
        self.offsets = writer.column("tile_name_offsets", "<u8")
        self.offsets.append([0])
        self.count = 0

    def add(self, names: Sequence[str], where: str) -> None:
        try:
            encoded = [os.fsencode(n) for n in names]
        except (UnicodeEncodeError, TypeError) as e:
            raise ValueError(f"{where}: a tile name that is not a file name ({e})") from None
        ends = np.cumsum(np.fromiter(map(len, encoded), np.uint64, len(encoded)), dtype=np.uint64)
        self.offsets.append(ends + np.uint64(self.blob.offset))
        self.blob.write(b"".join(encoded))
        self.count += len(encoded)


def _write_slide_table(writer: IndexWriter, names: Sequence[str], name_starts: Sequence[int],
                       counts: Sequence[int]) -> None:
    blob = writer.blob("slide_names.bin")
    offsets = [0]
    for n in names:
        blob.write(os.fsencode(n))
        offsets.append(blob.offset)
    writer.array("slide_name_offsets", offsets, "<u8")
    writer.array("tile_starts", np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]), "<i8")
    writer.array("name_starts", np.asarray(name_starts, np.int64), "<i8")


def _json_events(f, where: str):
    import ijson

    try:
        yield from ijson.basic_parse(f, buf_size=1 << 20)
    except ijson.JSONError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def build_from_json(index_json: str | os.PathLike, out: str | os.PathLike, root: str | os.PathLike | None = None,
                    *, overwrite: bool = False, progress: Progress | None = None) -> Path:
    """The official index {slide_dir: [tile file, ...]} -> an index folder at `out`.

    Relative slide dirs resolve against `root` (default: the JSON's folder), stored absolute in the manifest; the
    reader can be pointed at another root. A repeated slide dir, a value that is not a list of strings, an empty
    index or malformed JSON is an error naming the file (and the slide dir); slide dirs with no tiles are counted.
    """
    index_json = Path(index_json)
    if not index_json.is_file():
        raise FileNotFoundError(f"tile index not found: {index_json}")
    base = Path(root) if root is not None else index_json.parent
    where = str(index_json)
    slides: dict[str, tuple[int, int]] = {}  # slide dir -> (name start, count), file order
    empty = 0
    with IndexWriter(out, "files", overwrite) as writer, open(index_json, "rb") as f:
        names = _Names(writer)
        events = _json_events(f, where)
        first = next(events, (None, None))[0]
        if first != "start_map":
            raise ValueError(f"tile index {where} must be a JSON object {{slide_dir: [files]}}")
        next_report = 10_000_000
        for ev, slide in events:
            if ev == "end_map":
                break
            ev, _ = next(events)
            if ev != "start_array":
                raise ValueError(f"tile index {where}: slide dir {slide!r} must map to a list of file names")
            if slide in slides:
                raise ValueError(f"tile index {where}: slide dir {slide!r} appears twice")
            start, chunk = names.count, []
            for ev, value in events:
                if ev == "string":
                    chunk.append(value)
                    if len(chunk) == _CHUNK:
                        names.add(chunk, f"{where} [{slide!r}]")
                        chunk = []
                elif ev == "end_array":
                    break
                else:
                    raise ValueError(f"tile index {where}: slide dir {slide!r} lists a {ev.replace('start_', '')} "
                                     "where a file name (string) belongs")
            names.add(chunk, f"{where} [{slide!r}]")
            count = names.count - start
            slides[slide] = (start, count)
            empty += count == 0
            if progress and names.count >= next_report:
                progress(names.count)
                next_report += 10_000_000
        if names.count == 0:
            raise ValueError(f"tile index {where} lists no tiles")
        order = sorted(s for s, (_, c) in slides.items() if c)  # IndexSource's order: sorted slide dirs
        _write_slide_table(writer, order, [slides[s][0] for s in order], [slides[s][1] for s in order])
        return writer.commit(
            {"num_tiles": names.count, "num_slides": len(order)},
            {"from": "json", "json": str(index_json.absolute()), "json_bytes": index_json.stat().st_size},
            {"root": str(base.absolute()), "empty_slides": empty})


def _sorted_entries(folder: Path, unreadable: list[str]) -> list[os.DirEntry]:
    """Entries in the order that makes a depth-first walk list files in sorted full-path order: a directory sorts
    as 'name/', a file as 'name' (no other name can start with 'name/')."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as e:
        unreadable.append(f"{folder}: {e.strerror or e}")
        return []
    keyed = []
    for e in entries:
        try:
            is_dir = e.is_dir() and not e.is_symlink()  # pathlib.rglob does not descend into symlinked folders
        except OSError:
            is_dir = False
        keyed.append((e.name + "/" if is_dir else e.name, is_dir, e))
    keyed.sort(key=lambda k: k[0])
    return [(is_dir, e) for _, is_dir, e in keyed]


def _suffix(name: str) -> str:
    """Path(name).suffix.lower() (FolderSource's test), with the cheaper splitext where the two agree."""
    return (Path(name).suffix if name.startswith(".") else os.path.splitext(name)[1]).lower()


def walk_runs(root: Path, extensions: Iterable[str], unreadable: list[str]):
    """Yields (relative dir, [file names]) runs: consecutive image files of one folder in sorted full-path order
    (a folder's files are split into several runs by its subfolders). Same files as FolderSource: image extension,
    `is_file()` (symlinked files count), no descent into symlinked folders."""
    exts = tuple(e.lower() for e in extensions)
    stack = [("", iter(_sorted_entries(root, unreadable)))]
    run: list[str] = []
    while stack:
        rel, entries = stack[-1]
        for is_dir, e in entries:
            if is_dir:
                if run:
                    yield rel, run
                    run = []
                sub = f"{rel}/{e.name}" if rel else e.name
                stack.append((sub, iter(_sorted_entries(root / sub, unreadable))))
                break
            try:
                ok = _suffix(e.name) in exts and e.is_file()
            except OSError:
                ok = False
            if ok:
                run.append(e.name)
                if len(run) >= _CHUNK:
                    yield rel, run
                    run = []
        else:
            if run:
                yield rel, run
                run = []
            stack.pop()


def build_from_folder(folder: str | os.PathLike, out: str | os.PathLike, *,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS, overwrite: bool = False,
                      progress: Progress | None = None) -> Path:
    """Every image file under `folder` -> an index folder at `out`, in FolderSource's order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tile folder not found: {folder}")
    unreadable: list[str] = []
    run_dirs, run_starts, run_counts = [], [], []
    with IndexWriter(out, "files", overwrite) as writer:
        names = _Names(writer)
        next_report = 10_000_000
        for rel, files in walk_runs(folder, extensions, unreadable):
            if run_dirs and run_dirs[-1] == rel and run_starts[-1] + run_counts[-1] == names.count:
                run_counts[-1] += len(files)  # a long run yielded in chunks
            else:
                run_dirs.append(rel)
                run_starts.append(names.count)
                run_counts.append(len(files))
            names.add(files, str(folder / rel))
            if progress and names.count >= next_report:
                progress(names.count)
                next_report += 10_000_000
        for u in unreadable:
            log.warning("gpfm-index: cannot list %s", u)
        if names.count == 0:
            raise ValueError(f"no image files found in {folder}")
        _write_slide_table(writer, run_dirs, run_starts, run_counts)
        return writer.commit({"num_tiles": names.count, "num_slides": len(run_dirs)},
                             {"from": "folder", "folder": str(folder.absolute()), "extensions": list(extensions)},
                             {"root": str(folder.absolute()), "unreadable_folders": unreadable[:100],
                              "num_unreadable_folders": len(unreadable)})
