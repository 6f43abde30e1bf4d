"""What a suite dataset is: its items (tile files or slides), their labels, patients and splits, and the content
hashes that key its features (the items) and its cells (the labels).

Tiles: a folder (label = the class subfolder; each tile is its own patient) or a CSV `path,label[,patient][,split]`
(paths relative to the CSV). Slides: a folder / .txt list of slides and a label CSV in gpfm-eval mil's format
(`slide_id,label` or `slide_id,time,event`, optional `case_id` and `split`); only labelled slides are extracted.
Synthetic datasets come from `synthetic.truth`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from pathlib import Path

from gpfm_jax.encoder_bench import synthetic
from gpfm_jax.encoder_bench.cache import HashCache, Store, digest
from gpfm_jax.encoder_bench.suite import DatasetSpec
from gpfm_jax.evaluation.bags import PATIENT_COLUMNS, SPLITS
from gpfm_jax.evaluation.data import read_table

log = logging.getLogger("gpfm_jax.encoder_bench")


@dataclasses.dataclass
class TileSet:
    ids: list[str]  # tile paths relative to `root` (as gpfm-extract stores them)
    files: list[str] | None  # absolute paths (None: synthetic)
    root: str | None
    labels: list[str]
    patients: list[str]
    splits: list[str] | None  # train / val / test per tile when the CSV has a split column
    content: str  # hash of the tile set (ids and file contents): keys the features
    label_key: str  # hash of labels, patients and splits: part of every cell key


@dataclasses.dataclass
class SlideSet:
    slide_ids: list[str]
    files: list[Path] | None  # None: synthetic
    labels_csv: Path
    patient: str | None  # patient column name for gpfm-eval mil
    content: dict[str, str]  # slide id -> hash of the slide file (keys its features)
    label_key: str


def _patient_column(ds: DatasetSpec, header: list[str], path: Path) -> str | None:
    col = ds.patient or next((c for c in PATIENT_COLUMNS if c in header), None)
    if col is not None and col not in header:
        raise ValueError(f"{path}: no patient column {col!r} (datasets.{ds.name}.patient; columns: {header})")
    return col


def tile_set(ds: DatasetSpec, hashes: HashCache) -> TileSet:
    if ds.kind == "synthetic":
        t = synthetic.truth(ds.synthetic)
        content = digest({"synthetic": ds.synthetic, "version": synthetic.GENERATOR_VERSION})
        return TileSet(t.ids, None, None, t.labels, t.patients, None, content,
                       digest([content, t.labels, t.patients]))
    if ds.csv:
        path = Path(ds.csv)
        header, rows = read_table(path)
        if "path" not in header or "label" not in header:
            raise ValueError(f"{path}: a tile CSV needs columns path,label (datasets.{ds.name}.csv); got {header}")
        pcol = _patient_column(ds, header, path)
        root = path.parent
        ids, labels, patients, splits = [], [], [], []
        for i, r in enumerate(rows):
            if not r["path"] or not r["label"]:
                raise ValueError(f"{path}: row {i + 2}: empty path or label")
            ids.append(os.path.normpath(r["path"]))
            labels.append(r["label"])
            patients.append(r[pcol] if pcol else ids[-1])
            splits.append(r.get("split", "").lower())
        if "split" in header:
            if bad := sorted(set(splits) - set(SPLITS)):
                raise ValueError(f"{path}: split values must be {list(SPLITS)}, got {bad}")
        else:
            splits = None
        files = [str((root / p).absolute()) for p in ids]
        if missing := [f for f in files if not Path(f).is_file()]:
            raise ValueError(f"{path}: {len(missing)} listed tile(s) do not exist, e.g. {missing[0]}")
    else:
        from gpfm_jax.data.sources import FolderSource

        root = Path(ds.tiles)
        src = FolderSource(root)
        files = [src.path(i) for i in range(len(src))]
        ids = [os.path.relpath(f, root) for f in files]
        labels = [Path(p).parent.name for p in ids]
        if any(not lab for lab in labels):
            raise ValueError(f"{root}: tiles must sit in class subfolders (datasets.{ds.name}.tiles), or give a csv")
        patients, splits = list(ids), None
    if len(set(ids)) != len(ids):
        raise ValueError(f"datasets.{ds.name}: a tile is listed twice")
    if len(set(labels)) < 2:
        raise ValueError(f"datasets.{ds.name}: one class only ({labels[0]!r}); classification needs two or more")
    content = digest(sorted((i, hashes.file_sha(f)) for i, f in zip(ids, files)))
    return TileSet(ids, files, str(root), labels, patients, splits, content,
                   digest([ids, labels, patients, splits]))


def slide_set(ds: DatasetSpec, hashes: HashCache, store: Store) -> SlideSet:
    if ds.kind == "synthetic":
        header, rows = synthetic.label_rows(ds.synthetic)
        tag = digest({"synthetic": ds.synthetic, "version": synthetic.GENERATOR_VERSION})
        csv_path = store.root / "labels" / f"{tag}.csv"
        if not csv_path.is_file():
            _write_csv_atomic(csv_path, header, rows)
        ids = [r[0] for r in rows]
        return SlideSet(ids, None, csv_path, "case_id", {i: digest([tag, i]) for i in ids}, digest([tag, rows]))
    from gpfm_jax.extract.inputs import resolve_input

    csv_path = Path(ds.labels)
    header, rows = read_table(csv_path)
    if "slide_id" not in header:
        raise ValueError(f"{csv_path}: needs a slide_id column (datasets.{ds.name}.labels); got {header}")
    pcol = _patient_column(ds, header, csv_path)
    slides = {Path(s).stem: Path(s) for s in resolve_input(ds.slides, "slides").slides}
    labelled = [r["slide_id"] for r in rows]
    ids = [s for s in labelled if s in slides]
    if not ids:
        raise ValueError(f"datasets.{ds.name}: no slide in {ds.slides} is listed in {csv_path}")
    if unlabelled := sorted(set(slides) - set(labelled)):
        log.warning("datasets.%s: %d slide(s) without a label are not extracted: %s", ds.name, len(unlabelled),
                    ", ".join(unlabelled[:10]))
    content = {i: hashes.file_sha(slides[i]) for i in ids}
    return SlideSet(ids, [slides[i] for i in ids], csv_path, pcol, content,
                    digest([hashes.file_sha(csv_path), pcol]))


def _write_csv_atomic(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    os.replace(tmp, path)

