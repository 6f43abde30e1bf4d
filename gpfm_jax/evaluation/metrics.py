"""Classification metrics in NumPy, defined as scikit-learn defines them (so numbers compare across papers), plus a
percentile bootstrap with a fixed seed (for these metrics and, via `bootstrap_metric`, any other, e.g. the
c-index). No scikit-learn at run time: it is a test-only dependency.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (sklearn.metrics.balanced_accuracy_score)."""
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over the labels in y_true or y_pred (sklearn f1_score(average='macro'))."""
    tp = np.diag(cm).astype(np.float64)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    used = (cm.sum(0) + cm.sum(1)) > 0
    return float(np.mean(2 * tp[used] / (2 * tp[used] + fp[used] + fn[used])))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (scipy.stats.rankdata 'average')."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney statistic (ties count 1/2); nan if one class is absent."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Two classes: AUC of class 1's score. More: one-vs-rest macro average over the classes present in y_true
    (sklearn roc_auc_score(multi_class='ovr', average='macro') when every class is present)."""
    if proba.shape[1] == 2:
        return binary_auc(y_true == 1, proba[:, 1])
    values = [binary_auc(y_true == c, proba[:, c]) for c in range(proba.shape[1]) if np.any(y_true == c)]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """y_true int [N], proba float [N, C] (rows = class scores; the prediction is the argmax)."""
    y_true = np.asarray(y_true, np.int64)
    proba = np.asarray(proba, np.float64)
    y_pred = proba.argmax(1)
    cm = _confusion(y_true, y_pred, proba.shape[1])
    return {"accuracy": float(np.mean(y_true == y_pred)), "balanced_accuracy": balanced_accuracy(cm),
            "macro_f1": macro_f1(cm), "auc": auc(y_true, proba)}


def bootstrap_metric(fn, arrays: tuple[np.ndarray, ...], num_samples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of fn(*resampled arrays) (rows resampled together, fixed seed); nan draws are dropped."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    draws = []
    for _ in range(num_samples):
        idx = rng.integers(0, n, n)
        draws.append(fn(*(a[idx] for a in arrays)))
    return _percentiles(np.asarray(draws, np.float64), level)


def _percentiles(v: np.ndarray, level: float) -> tuple[float, float]:
    v = v[~np.isnan(v)]
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v.size else (np.nan, np.nan)


def bootstrap(y_true: np.ndarray, proba: np.ndarray, num_samples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals: resample the test set with replacement `num_samples` times (fixed seed)."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    draws = {m: [] for m in METRICS}
    for _ in range(num_samples):
        idx = rng.integers(0, n, n)
        for k, v in classification_metrics(y_true[idx], proba[idx]).items():
            draws[k].append(v)
    return {k: _percentiles(np.asarray(v, np.float64), level) for k, v in draws.items()}
