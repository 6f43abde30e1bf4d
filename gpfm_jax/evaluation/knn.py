"""Weighted kNN as in DINO / DINOv2: cosine similarity of L2-normalised features, the k most similar training
samples vote for their class with weight exp(similarity / T)."""

from __future__ import annotations

import numpy as np


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """float64 [N_test, C]: each row the normalised class votes (sums to 1), usable as probabilities for AUC."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = l2_normalise(train_x)
    test = l2_normalise(test_x)
    train_y = np.asarray(train_y, np.int64)
    k = min(k, len(train))
    out = np.zeros((len(test), num_classes), np.float64)
    for start in range(0, len(test), chunk):
        sim = test[start : start + chunk] @ train.T  # [n, N_train]
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, top, axis=1).astype(np.float64)
        weights = np.exp(top_sim / temperature)  # sim <= 1: at most exp(1 / T)
        rows = np.repeat(np.arange(len(top)), k)
        np.add.at(out[start : start + chunk], (rows, train_y[top].ravel()), weights.ravel())
    return out / out.sum(1, keepdims=True)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> np.ndarray:
    return knn_scores(train_x, train_y, test_x, num_classes, k, temperature).argmax(1)
