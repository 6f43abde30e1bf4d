"""Few-shot tile classification: SimpleShot (Wang et al. 2019), the few-shot protocol of UNI and its successors.

An episode samples `shots` training tiles per class (the support set). Features are centred by the support mean and
L2-normalised ("CL2N"), each class's prototype is the mean of its normalised support features, and a query goes to
the nearest prototype (Euclidean). Class scores are softmax(-squared distance): their argmax is the nearest
prototype, and for two classes the score of class 1 is a monotone function of d0^2 - d1^2, so AUC is the
prototype margin's AUC. The tests check the predictions against scikit-learn's `NearestCentroid` on the same
CL2N features.
"""

from __future__ import annotations

import numpy as np


def sample_support(y: np.ndarray, shots: int, rng: np.random.Generator, num_classes: int | None = None) -> np.ndarray:
    """Indices of `shots` rows per class (all of a class's rows when it has fewer), sorted."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    y = np.asarray(y)
    classes = range(num_classes) if num_classes is not None else np.unique(y)
    picked = []
    for c in classes:
        rows = np.flatnonzero(y == c)
        if len(rows):
            picked.append(rng.choice(rows, min(shots, len(rows)), replace=False))
    return np.sort(np.concatenate(picked))


def cl2n(support: np.ndarray, queries: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Centre both by the support mean, then L2-normalise each row."""
    support, queries = np.asarray(support, np.float64), np.asarray(queries, np.float64)
    mean = support.mean(0)
    norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)  # noqa: E731
    return norm(support - mean), norm(queries - mean)


def simpleshot_scores(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray,
                      num_classes: int) -> np.ndarray:
    """float64 [Q, C] class scores (rows sum to 1); a class without support gets score 0."""
    s, q = cl2n(support_x, query_x)
    support_y = np.asarray(support_y)
    present = np.array([np.any(support_y == c) for c in range(num_classes)])
    protos = np.stack([s[support_y == c].mean(0) if present[c] else np.zeros(s.shape[1]) for c in range(num_classes)])
    d2 = (q**2).sum(1)[:, None] + (protos**2).sum(1)[None, :] - 2.0 * q @ protos.T
    logits = np.where(present[None, :], -d2, -np.inf)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)
