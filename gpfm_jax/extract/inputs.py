"""What `--input` is: a tile folder, a JSON tile index, one slide, a folder of slides, or a text list of slides.

Slides may also be named by URL (gs://, s3://: a slide, a folder searched recursively, or a list file); they are
then kept as URL strings and downloaded just in time (remote.py). Tile sets are read from local files only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# Extensions that only whole-slide formats use; .tif/.tiff are also plain tile images, so a folder of them is
# taken for slides only with --input-kind slides (a single .tif file given directly is always a slide).
SLIDE_ONLY_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".czi")
SLIDE_EXTENSIONS = SLIDE_ONLY_EXTENSIONS + (".tif", ".tiff", ".dcm")
LIST_EXTENSIONS = (".txt", ".lst")
INPUT_KINDS = ("auto", "tiles", "slides")


@dataclasses.dataclass
class TileInput:
    paths: list[str]  # absolute (or as resolved) tile file paths, in a stable order
    root: str  # paths are stored relative to this in the output
    origin: str


@dataclasses.dataclass
class SlideInput:
    slides: list  # Path, or str for a URL
    origin: str


def _remote_slides(url: str, kind: str) -> SlideInput:
    from gpfm_jax import storage

    storage.check_reachable(url)
    root = storage.resolve(url)
    suffix = root.suffix.lower()
    if suffix in LIST_EXTENSIONS:
        if not root.exists():
            raise FileNotFoundError(f"--input {url}: no such object")
        lines = [ln.strip() for ln in root.read_text().splitlines()]
        slides = [ln if storage.is_url(ln) else str(root.parent / ln) for ln in lines if ln and not ln.startswith("#")]
        if not slides:
            raise ValueError(f"slide list {url} names no slides")
        return SlideInput(slides, url)
    if suffix in SLIDE_EXTENSIONS and root.is_file():
        return SlideInput([str(root)], url)
    if suffix == ".json" or kind == "tiles":
        raise ValueError(f"--input {url}: tile sets are read from local files; copy them first (slides may be URLs)")
    extensions = SLIDE_EXTENSIONS if kind == "slides" else SLIDE_ONLY_EXTENSIONS

    def walk(folder):  # a bucket has no recursive glob: one listing per folder
        for item in sorted(folder.iterdir(), key=lambda p: p.name):
            if item.is_dir():
                yield from walk(item)
            elif item.suffix.lower() in extensions:
                yield str(item)

    if not root.is_dir():
        raise FileNotFoundError(f"--input {url}: no such object or folder")
    slides = list(walk(root))
    if not slides:
        raise ValueError(f"--input {url}: no slide files ({', '.join(extensions)}) under this prefix")
    return SlideInput(slides, url)


def _find(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def _read_list(list_file: Path) -> list[Path]:
    """One slide path per line (relative to the list file's folder); blank lines and # comments ignored."""
    out = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(p if p.is_absolute() else list_file.parent / p)
    if not out:
        raise ValueError(f"slide list {list_file} names no slides")
    return out


def _tiles(path: Path) -> TileInput:
    from gpfm_jax.data.sources import FolderSource, IndexSource

    if path.is_dir():
        src, root = FolderSource(path), path  # raises ValueError for a folder without image files
    else:
        src, root = IndexSource(path), path.parent
    return TileInput([src.path(i) for i in range(len(src))], str(root), str(path))


def resolve_input(path: str | os.PathLike, kind: str = "auto") -> TileInput | SlideInput:
    """Classifies --input; raises FileNotFoundError / ValueError with a message naming the path."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {kind!r}")
    if str(path).startswith(("gs://", "s3://")):
        return _remote_slides(str(path), kind)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            if kind == "slides":
                raise ValueError(f"--input {path}: a JSON tile index, but --input-kind slides was given")
            return _tiles(path)
        if suffix in LIST_EXTENSIONS:
            return SlideInput(_read_list(path), str(path))
        if kind == "tiles":
            raise ValueError(f"--input {path}: a single file cannot be a tile folder")
        return SlideInput([path], str(path))
    if kind == "tiles":
        return _tiles(path)
    slides = _find(path, SLIDE_EXTENSIONS if kind == "slides" else SLIDE_ONLY_EXTENSIONS)
    if slides:
        return SlideInput(slides, str(path))
    if kind == "slides":
        raise ValueError(f"--input {path}: no slide files ({', '.join(SLIDE_EXTENSIONS)}) in this folder")
    return _tiles(path)
