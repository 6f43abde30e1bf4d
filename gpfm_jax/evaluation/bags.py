"""Slide-level data for MIL: the per-slide `.h5` files of gpfm-extract (`features` [N, D], `coords` [N, 2]), a label
CSV (`slide_id,label` or `slide_id,time,event`, optional `split` and patient columns), patient-grouped stratified
folds, and padding of bags to a few bucket sizes with masks (so a jitted step compiles once per bucket, not once per
slide).

Bad input is reported by name: a labelled slide without a feature file and a feature file without a label are
warnings (the slide is left out and listed); an unreadable, empty or NaN feature file and a label set with one
class are errors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import h5py
import numpy as np

from gpfm_jax.evaluation.data import read_table

log = logging.getLogger("gpfm_jax.evaluate")

PATIENT_COLUMNS = ("case_id", "patient_id", "patient")  # CLAM / TCGA spell it case_id
SPLITS = ("train", "val", "test")


class BagError(ValueError):
    """Bad slide-level input; the message names the slide, file or fold."""


@dataclasses.dataclass
class SlideTable:
    """One row per usable slide (labelled and with a feature file), in CSV order."""

    slide_ids: list[str]
    files: list[Path]
    patients: list[str]  # the slide id itself when the CSV has no patient column
    splits: list[str] | None  # per slide "train" | "val" | "test" when the CSV has a split column
    labels: np.ndarray | None = None  # classification: int [S]
    classes: list[str] | None = None
    time: np.ndarray | None = None  # survival: float [S]
    event: np.ndarray | None = None  # survival: bool [S]
    missing_features: list[str] = dataclasses.field(default_factory=list)
    unlabelled_files: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slide_ids)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    header, rows = read_table(path)
    if "slide_id" not in header:
        raise BagError(f"{path}: needs a header with a 'slide_id' column, got {header}")
    return header, rows


def feature_files(features_dir: str | os.PathLike) -> dict[str, Path]:
    """{slide_id: path} of the `.h5` files in a folder (slide id = file stem, as gpfm-extract names them)."""
    root = Path(features_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"feature folder not found: {root}")
    return {p.stem: p for p in sorted(root.glob("*.h5")) if not p.name.startswith(".")}


def load_table(features_dir: str | os.PathLike, labels_csv: str | os.PathLike, task: str,
               patient_column: str | None = None) -> SlideTable:
    """Joins the label CSV with the feature folder; warns about (and leaves out) slides on one side only."""
    path = Path(labels_csv)
    header, rows = _read_csv(path)
    need = ("label",) if task == "classification" else ("time", "event")
    if missing := [c for c in need if c not in header]:
        raise BagError(f"{path}: a {task} CSV needs columns slide_id,{','.join(need)}; missing {missing}")
    pcol = patient_column or next((c for c in PATIENT_COLUMNS if c in header), None)
    if pcol is not None and pcol not in header:
        raise BagError(f"{path}: no patient column {pcol!r} (columns: {header})")
    files = feature_files(features_dir)
    seen: set[str] = set()
    keep, missing_features = [], []
    for i, row in enumerate(rows):
        sid = row["slide_id"]
        if sid in seen:
            raise BagError(f"{path}: slide {sid!r} is listed twice (row {i + 2})")
        seen.add(sid)
        if any(row.get(c, "") == "" for c in need):
            log.warning("slide %s: empty %s in %s; left out", sid, "/".join(need), path)
            continue
        if sid not in files:
            missing_features.append(sid)
            continue
        keep.append(row)
    if missing_features:
        log.warning("%d labelled slide(s) have no feature file in %s and are left out: %s", len(missing_features),
                    features_dir, ", ".join(missing_features[:20]) + (" ..." if len(missing_features) > 20 else ""))
    unlabelled = sorted(set(files) - seen)
    if unlabelled:
        log.warning("%d feature file(s) in %s have no label in %s and are ignored: %s", len(unlabelled),
                    features_dir, path, ", ".join(unlabelled[:20]) + (" ..." if len(unlabelled) > 20 else ""))
    if not keep:
        raise BagError(f"no slide in {path} has a feature file in {features_dir}")
    splits = None
    if "split" in header:
        splits = [r["split"].lower() for r in keep]
        if bad := sorted({s for s in splits} - set(SPLITS)):
            raise BagError(f"{path}: split values must be {SPLITS}, got {bad}")
    table = SlideTable([r["slide_id"] for r in keep], [files[r["slide_id"]] for r in keep],
                       [r[pcol] if pcol else r["slide_id"] for r in keep], splits,
                       missing_features=missing_features, unlabelled_files=unlabelled)
    if task == "classification":
        names = [r["label"] for r in keep]
        table.classes = sorted(set(names))
        if len(table.classes) < 2:
            raise BagError(f"{path}: only one class ({table.classes[0]!r}) among the {len(keep)} slides with "
                           f"features; classification needs two or more")
        table.labels = np.array([table.classes.index(n) for n in names], np.int64)
    else:
        try:
            table.time = np.array([float(r["time"]) for r in keep], np.float64)
            table.event = np.array([_as_event(r["event"]) for r in keep], bool)
        except ValueError as e:
            raise BagError(f"{path}: {e}") from None
        if bad := [s for s, t in zip(table.slide_ids, table.time) if not np.isfinite(t) or t < 0]:
            raise BagError(f"{path}: survival times must be finite and >= 0; bad for {bad[:10]}")
        if not table.event.any():
            raise BagError(f"{path}: no slide has an event (event=1); survival models need events")
    return table


def _as_event(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "1.0", "true", "dead", "yes"):
        return True
    if v in ("0", "0.0", "false", "alive", "no"):
        return False
    raise ValueError(f"event must be 0/1, got {value!r}")


def read_bag(path: Path, with_coords: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """features f32 [N, D] (and coords int [N, 2]) of one slide; errors name the file."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise BagError(f"{path}: no 'features' dataset (has {sorted(f)}); not a gpfm-extract slide file")
            x = np.asarray(f["features"][()], np.float32)
            coords = np.asarray(f["coords"][()]) if with_coords and "coords" in f else None
    except OSError as e:
        raise BagError(f"{path}: unreadable HDF5 file ({e})") from None
    if x.ndim != 2 or x.shape[0] == 0:
        raise BagError(f"{path}: empty feature file (features shape {x.shape}); re-extract this slide")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise BagError(f"{path}: {bad} of {len(x)} feature rows contain NaN or Inf; re-extract this slide")
    if with_coords and (coords is None or len(coords) != len(x)):
        raise BagError(f"{path}: needs 'coords' with one row per feature row")
    return x, coords


class BagStore:
    """Reads bags on demand, keeping them in memory up to `cache_bytes` (big cohorts do not fit)."""

    def __init__(self, files: list[Path], cache_bytes: float = 8e9):
        self.files = files
        self.cache: dict[int, np.ndarray] = {}
        self.budget = cache_bytes
        self.used = 0

    def __getitem__(self, i: int) -> np.ndarray:
        if i in self.cache:
            return self.cache[i]
        x, _ = read_bag(self.files[i])
        if self.used + x.nbytes <= self.budget:
            self.cache[i] = x
            self.used += x.nbytes
        return x

    def check_all(self) -> tuple[int, list[int]]:
        """Reads every bag once (fails early, naming the file) and returns (feature dim, bag sizes)."""
        dims, sizes = set(), []
        for i in range(len(self.files)):
            x = self[i]
            dims.add(x.shape[1])
            sizes.append(len(x))
        if len(dims) != 1:
            raise BagError(f"feature files disagree on the feature dimension: {sorted(dims)}")
        return dims.pop(), sizes


# ---------------------------------------------------------------------------------------------------- folds


def grouped_folds(strata: np.ndarray, groups: list[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index per slide: patients are shuffled (seeded) and dealt round-robin within each stratum (class, or
    event status for survival), so every patient's slides share one fold and strata are spread evenly."""
    if k < 2:
        raise BagError(f"--folds must be >= 2, got {k}")
    uniq = sorted(set(groups))
    if len(uniq) < k:
        raise BagError(f"{len(uniq)} patients cannot fill {k} folds")
    index = {g: i for i, g in enumerate(uniq)}
    gid = np.array([index[g] for g in groups])
    # A patient's stratum: the most common one among its slides.
    pstrat = np.array([np.bincount(strata[gid == g]).argmax() for g in range(len(uniq))])
    rng = np.random.default_rng(seed)
    pfold = np.empty(len(uniq), np.int64)
    offset = 0
    for s in np.unique(pstrat):
        members = rng.permutation(np.flatnonzero(pstrat == s))
        pfold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)  # the next stratum starts where this one stopped: fold sizes stay balanced
    return pfold[gid]


def fold_splits(table: SlideTable, strata: np.ndarray, k: int | None, seed: int) -> list[dict[str, np.ndarray]]:
    """[{train, val, test: slide indices}] per fold: the CSV's split column (one fold), or k grouped folds where
    fold i is the test set and fold i+1 (mod k) the validation set used for early stopping."""
    if table.splits is not None and not k:
        s = np.array(table.splits)
        out = [{name: np.flatnonzero(s == name) for name in SPLITS}]
        for name in ("train", "test"):
            if len(out[0][name]) == 0:
                raise BagError(f"the split column has no '{name}' slides")
        if len(out[0]["val"]) == 0:
            raise BagError("the split column has no 'val' slides (needed for early stopping)")
        _check_patients(table, out[0])
        return out
    fold = grouped_folds(strata, table.patients, k or 5, seed)
    k = int(fold.max()) + 1
    return [{"train": np.flatnonzero((fold != i) & (fold != (i + 1) % k)), "val": np.flatnonzero(fold == (i + 1) % k),
             "test": np.flatnonzero(fold == i)} for i in range(k)]


def _check_patients(table: SlideTable, split: dict[str, np.ndarray]) -> None:
    owner: dict[str, str] = {}
    for name, idx in split.items():
        for i in idx:
            p = table.patients[i]
            if owner.setdefault(p, name) != name:
                raise BagError(f"patient {p!r} has slides in both '{owner[p]}' and '{name}' splits")


# ---------------------------------------------------------------------------------------------------- buckets


def bucket_sizes(max_size: int, smallest: int = 256, factor: float = 1.25, multiple: int = 64) -> list[int]:
    """Padded bag sizes: smallest, then x factor (rounded up to `multiple`) until max_size is covered. With 1.25 a
    bag wastes at most a fifth of its compute on padding (~13% on log-uniform sizes) and 100k tiles need 27 buckets
    (compiles, ~1 s each for ABMIL); 1.5 halves the buckets and doubles the waste (measured in tools/bench_mil.py)."""
    sizes = [max(smallest, multiple)]
    while sizes[-1] < max_size:
        sizes.append(int(math.ceil(sizes[-1] * factor / multiple) * multiple))
    return sizes


def bucket_for(n: int, sizes: list[int]) -> int:
    for s in sizes:
        if n <= s:
            return s
    raise BagError(f"a bag of {n} tiles exceeds the largest bucket {sizes[-1]}")


def pad_bags(bags: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """x f32 [B, size, D] (zeros past each bag's end) and mask bool [B, size]."""
    d = bags[0].shape[1]
    x = np.zeros((len(bags), size, d), np.float32)
    mask = np.zeros((len(bags), size), bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


def subsample(bag: np.ndarray, max_instances: int | None, rng: np.random.Generator) -> np.ndarray:
    """A random subset of `max_instances` tiles (training-time augmentation that also caps the compute per step)."""
    if not max_instances or len(bag) <= max_instances:
        return bag
    return bag[np.sort(rng.choice(len(bag), max_instances, replace=False))]
