"""Features and labels for evaluation: HDF5 files written by gpfm-extract, labels from a CSV (path,label) or from
the folder names in the stored tile paths, and seeded stratified splits."""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from pathlib import Path

import h5py
import numpy as np

log = logging.getLogger("gpfm_jax.evaluate")


def read_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV with a header line; blank lines and '#' comments skipped, names and values stripped.
    The one reader of label tables (gpfm-eval's slide labels, gpfm-bench's datasets)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(row for row in f if row.strip() and not row.startswith("#"))
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    return header, rows


@dataclasses.dataclass
class LabelledFeatures:
    features: np.ndarray  # float32 [N, D]
    labels: list[str]  # [N]
    paths: list[str]  # [N]


def read_features(files: list[str | os.PathLike]) -> tuple[np.ndarray, list[str]]:
    """Concatenated `features` and `paths` of one or more tile-feature .h5 files."""
    feats, paths = [], []
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise FileNotFoundError(f"feature file not found: {f}")
        with h5py.File(f, "r") as h5:
            if "features" not in h5 or "paths" not in h5:
                raise ValueError(f"{f}: needs datasets 'features' and 'paths' (tile features from gpfm-extract); "
                                 f"has {sorted(h5)}")
            feats.append(np.asarray(h5["features"][()], np.float32))
            paths += [p.decode() if isinstance(p, bytes) else str(p) for p in h5["paths"][()]]
    return np.concatenate(feats), paths


def read_label_csv(csv_file: str | os.PathLike) -> dict[str, str]:
    """{path: label} from a CSV with columns path,label (a header row naming them is optional)."""
    out: dict[str, str] = {}
    with open(csv_file, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{csv_file}:{i + 1}: expected 'path,label', got {row}")
            if i == 0 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            out[row[0].strip()] = row[1].strip()
    if not out:
        raise ValueError(f"{csv_file}: no labels")
    return out


def _lookup(table: dict[str, str], path: str) -> str | None:
    """The label of a stored path: exact, then normalised, then by file name, then by stem."""
    for key in (path, os.path.normpath(path), Path(path).name, Path(path).stem):
        if key in table:
            return table[key]
    return None


def load_labelled(files: list[str | os.PathLike], label_csv: str | os.PathLike | None = None) -> LabelledFeatures:
    """Features with a label each; rows whose path has no label in the CSV are dropped (with a warning)."""
    feats, paths = read_features(files)
    if label_csv is None:
        labels = [Path(p).parent.name for p in paths]
        if any(not lab for lab in labels):
            raise ValueError("labels from folder names need tile paths inside class folders; pass --labels CSV")
        return LabelledFeatures(feats, labels, paths)
    table = read_label_csv(label_csv)
    labels = [_lookup(table, p) for p in paths]
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    if not keep:
        raise ValueError(f"none of the {len(paths)} feature paths (e.g. {paths[0]!r}) has a label in {label_csv}")
    if len(keep) < len(paths):
        log.warning("%d of %d feature rows have no label in %s and are left out", len(paths) - len(keep),
                    len(paths), label_csv)
    return LabelledFeatures(feats[keep], [labels[i] for i in keep], [paths[i] for i in keep])


def encode_labels(*label_lists: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """Class names (sorted) and int label arrays for each list."""
    classes = sorted(set().union(*map(set, label_lists)))
    index = {c: i for i, c in enumerate(classes)}
    return classes, [np.array([index[lab] for lab in labels], np.int64) for labels in label_lists]


def stratified_split(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) index arrays: about `fraction` of every class held out (at least one where a class has two
    or more samples, none where it has one)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = 0 if len(idx) < 2 else min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))
