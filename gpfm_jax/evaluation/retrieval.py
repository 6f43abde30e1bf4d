"""ROI retrieval as GPFM's `ROI_tasks/roi_retrieval.py` sets it up: features z-scored with the database's mean and
standard deviation (ddof 1, as torch.var_mean), Euclidean distance, each query's nearest database ROIs.

Metrics per query, averaged (with percentile bootstrap intervals over queries):
- `acc@k` (k = 1, 3, 5): majority vote of the k nearest labels equals the query's label; a tied vote goes to the
  tied class whose member ranks nearest (acc@1 is nearest-neighbour accuracy);
- `hit@k`: at least one of the k nearest has the query's label (UNI's Acc@K);
- `map@5`: average precision over the top 5, AP@5 = sum_i P@i * rel_i / (number relevant in the top 5), 0 if none.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from gpfm_jax.evaluation import metrics


def read_split_column(csv_file: str | os.PathLike) -> dict[str, str] | None:
    """{path: split} from a labels CSV whose header has path,label,split; None when it has no split column."""
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "split" not in [h.strip() for h in reader.fieldnames]:
            return None
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    return {r["path"]: r["split"].lower() for r in rows if r.get("path")}


def zscore(database: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    db = np.asarray(database, np.float64)
    mean, std = db.mean(0), db.std(0, ddof=1) if len(db) > 1 else np.ones(db.shape[1])
    std = np.where(std > 0, std, 1.0)  # a constant feature carries no distance (GPFM would divide by 0)
    return (db - mean) / std, (np.asarray(queries, np.float64) - mean) / std


def nearest(database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """int [Q, k]: database indices by increasing Euclidean distance (ties by index)."""
    k = min(k, len(database))
    d2 = (database**2).sum(1)
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), chunk):
        q = queries[s : s + chunk]
        dist = (q**2).sum(1)[:, None] + d2[None, :] - 2.0 * q @ database.T
        top = np.argpartition(dist, k - 1, axis=1)[:, :k] if k < len(database) else np.tile(
            np.arange(len(database)), (len(q), 1))
        order = np.lexsort((top, np.take_along_axis(dist, top, 1)), axis=1)
        out[s : s + chunk] = np.take_along_axis(top, order, 1)
    return out


def majority_vote(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """labels int [Q, k] in rank order -> the most frequent label per row, ties to the nearest-ranked tied class."""
    counts = np.zeros((len(labels), num_classes), np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(labels)), labels.shape[1]), labels.ravel()), 1)
    best = counts.max(1, keepdims=True)
    tied = counts == best  # [Q, C]
    first = np.argmax(np.take_along_axis(tied, labels, 1), axis=1)  # first ranked neighbour in a tied class
    return labels[np.arange(len(labels)), first]


def per_query(neighbour_labels: np.ndarray, query_labels: np.ndarray, num_classes: int,
              ks: tuple[int, ...] = (1, 3, 5), map_k: int = 5) -> dict[str, np.ndarray]:
    """Per-query 0/1 (or AP) values of every metric."""
    rel = neighbour_labels == query_labels[:, None]
    out = {}
    for k in ks:
        out[f"acc@{k}"] = (majority_vote(neighbour_labels[:, :k], num_classes) == query_labels).astype(np.float64)
        out[f"hit@{k}"] = rel[:, :k].any(1).astype(np.float64)
    r = rel[:, :map_k].astype(np.float64)
    precision = np.cumsum(r, 1) / np.arange(1, r.shape[1] + 1)
    hits = r.sum(1)
    out[f"map@{map_k}"] = np.where(hits > 0, (precision * r).sum(1) / np.maximum(hits, 1), 0.0)
    return out


def retrieval(database: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, q_labels: np.ndarray,
              num_classes: int, ks: tuple[int, ...] = (1, 3, 5), bootstrap: int = 1000,
              seed: int = 0) -> dict[str, dict]:
    db, q = zscore(database, queries)
    idx = nearest(db, q, max(max(ks), 5))
    values = per_query(np.asarray(db_labels)[idx], np.asarray(q_labels), num_classes, ks)
    out = {}
    for name, v in values.items():
        ci = metrics.bootstrap_metric(np.mean, (v,), bootstrap, seed) if bootstrap > 0 else None
        out[name] = {"value": float(v.mean()), "ci95": list(ci) if ci else None}
    return out
