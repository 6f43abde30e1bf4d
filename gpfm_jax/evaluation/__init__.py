"""Evaluation of extracted features (gpfm-eval): weighted kNN and linear probes, with bootstrap confidence intervals.

Modules: `data` (HDF5 features + labels, splits), `knn` (DINO's weighted kNN), `linear` (AdamW logistic regression
with early stopping), `metrics` (accuracy, balanced accuracy, macro-F1, AUC; bootstrap). The CLI is
gpfm_jax/evaluate.py (`python -m gpfm_jax.evaluate knn|linear ...`).
"""

from gpfm_jax.evaluation.knn import knn_predict, knn_scores
from gpfm_jax.evaluation.linear import LinearProbeConfig, train_linear_probe
from gpfm_jax.evaluation.metrics import bootstrap, classification_metrics

__all__ = ["LinearProbeConfig", "bootstrap", "classification_metrics", "knn_predict", "knn_scores",
           "train_linear_probe"]
