"""Evaluation of extracted features (gpfm-eval), with bootstrap confidence intervals.

Tile level: `data` (HDF5 features + labels, splits), `knn` (DINO's weighted kNN), `linear` (AdamW logistic
regression with early stopping), `fewshot` (SimpleShot nearest centroid), `retrieval` (ROI retrieval), `metrics`
(accuracy, balanced accuracy, macro-F1, AUC; bootstrap). Slide level: `bags` (slide files, label CSV,
patient-grouped folds, bucketed padding); the MIL heads layered `mil_layers` (config, shared layers) < `transmil`
(TransMIL) < `mil_models` (ABMIL, mean pooling, `build_model`); `survival` (NLL-surv, Cox, c-index), `mil_train`
(one fold), `mil_cv` (cross-validation, results), `heatmap` (attention over the thumbnail). The CLI is `cli`
(`gpfm-eval` / `python -m gpfm_jax.evaluation knn|linear|retrieval|mil|heatmap ...`).
"""

from gpfm_jax.evaluation.knn import knn_predict, knn_scores
from gpfm_jax.evaluation.linear import LinearProbeConfig, train_linear_probe
from gpfm_jax.evaluation.metrics import bootstrap, classification_metrics

__all__ = ["LinearProbeConfig", "bootstrap", "classification_metrics", "knn_predict", "knn_scores",
           "train_linear_probe"]
