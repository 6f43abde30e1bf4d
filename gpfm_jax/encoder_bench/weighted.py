"""Evaluation metrics of prediction rows under integer row weights, for a batch of weightings at once, in JAX.

A bootstrap resample is a multiset: drawing patients with replacement gives every row a weight equal to how many
times its patient was drawn, and a metric of the resampled rows is exactly the metric of the original rows under
those weights. So a replicate needs no gathering of rows and no re-sorting: everything fixed (sort orders, tie
groups, pair matrices, one-hot tables) is prepared once in NumPy, and a replicate costs weighted sums. The batch of
replicates is the last axis of every array here (B), so each elementary step works on contiguous B-vectors.

Definitions follow scikit-learn / lifelines exactly (tests compare on explicit resamples):
- accuracy; balanced accuracy = mean recall over the classes with weight in y_true (`balanced_accuracy_score`);
  macro-F1 over the labels in y_true or y_pred (`f1_score(average="macro")`), with 2 tp + fp + fn = true_c + pred_c.
  All three come from per-unit sums (support, hits and predictions per class), i.e. a matrix product of the unit
  counts with a fixed table;
- AUC by the Mann-Whitney statistic, ties 1/2 (`roc_auc_score`): a positive row counts the negative weight with a
  lower score plus half the negative weight with the same score, i.e. the mean of the negatives' cumulative weight
  (in score order) at the two ends of its tie; only the negatives are summed, only the positives gathered. Two
  classes: class 1's score; more: one-vs-rest over the classes present, averaged (undefined classes left out, as
  `gpfm_jax.evaluation.metrics.auc`);
- Harrell's c-index with lifelines' tie rules, the bilinear form c^T A c / c^T C c in unit counts c over pair
  matrices summed per unit pair (`cindex_pairs`): C_ij = 1 for a comparable pair (i had the event and t_i < t_j, or
  t_i == t_j with j censored), A_ij = C_ij (1[r_i > r_j] + 1/2 1[r_i == r_j]);
- per-row values (retrieval's acc@k, hit@k, AP@5 per query): the weighted mean.

float32: weighted counts are exact integers up to 2^24; a Mann-Whitney numerator or c-index sum over more than
~8000 rows exceeds that and carries float32 rounding (relative ~1e-7), far below any bootstrap spread.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _ratio(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def _mean_where(values, ok, axis):
    return _ratio(jnp.sum(jnp.where(ok, values, 0.0), axis), jnp.sum(ok, axis))


def class_metric(metric: str, support, hits, predicted):
    """support [..., C, B] (weight per true class), hits [..., C, B] (weight predicted right per true class),
    predicted [..., C, B] (weight per predicted class) -> [..., B]."""
    if metric == "accuracy":
        return _ratio(hits.sum(-2), support.sum(-2))
    if metric == "balanced_accuracy":
        present = support > 0
        return _mean_where(hits / jnp.where(present, support, 1.0), present, -2)
    if metric == "macro_f1":
        denom = support + predicted
        used = denom > 0
        return _mean_where(2.0 * hits / jnp.where(used, denom, 1.0), used, -2)
    raise ValueError(f"not a class metric: {metric}")


def cumsum(x, block: int = 64):
    """Inclusive cumulative sum along axis 0 of x [N, ...] as two small matrix products: within blocks of `block`
    rows (a triangular [block, block] matrix) and over the block totals. XLA's own cumsum on the CPU is a
    reduce-window, ~4x slower here; on integer-valued float32 both are exact up to 2^24."""
    n = x.shape[0]
    block = min(block, n)
    if n % block:
        raise ValueError(f"cumsum: length {n} is not a multiple of the block {block}")
    xb = x.reshape(n // block, block, *x.shape[1:])
    within = jnp.einsum("ij,nj...->ni...", jnp.tril(jnp.ones((block, block), x.dtype)), xb)
    before = jnp.einsum("ij,j...->i...", jnp.tril(jnp.ones((n // block, n // block), x.dtype), -1), within[:, -1])
    return (within + before[:, None]).reshape(x.shape)


def auc_column(w_neg, w_pos, lo, hi):
    """One score column under a batch of weightings. w_neg [Nn, B]: the negatives' weights in ascending score
    order; w_pos [Np, B]: the positives' weights; lo, hi [Np]: how many negatives lie below the positive's tie group
    and below its end. Mann-Whitney: sum_pos w * (negative weight below + half the tied) / (W_pos W_neg) [B], nan
    without a positive or a negative."""
    csn = jnp.concatenate([jnp.zeros((1, w_neg.shape[1]), w_neg.dtype), cumsum(w_neg)])  # exclusive prefix sums
    num = 0.5 * jnp.sum(w_pos * (csn[lo] + csn[hi]), axis=0)
    total_pos, total_neg = w_pos.sum(0), csn[-1]
    return jnp.where((total_pos > 0) & (total_neg > 0), num / jnp.maximum(total_pos * total_neg, 1e-30), jnp.nan)


def bilinear(matrix, c):
    """sum_uv c_u M_uv c_v for matrices [..., P, P] and counts c [..., P, B] -> [..., B]."""
    return jnp.sum(jnp.einsum("...uv,...vb->...ub", matrix, c) * c, axis=-2)


# ------------------------------------------------------------------------------------- fixed layouts (NumPy, once)


def auc_layout(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(negatives, positives, lo, hi) of one score column: the negative rows in ascending score order, the positive
    rows, and for each positive the number of negatives with a lower score (lo) and with a lower or equal score
    (hi); `auc_column` needs nothing else."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    order = np.argsort(scores, kind="stable")
    negatives = order[~positive[order]]
    neg_sorted = scores[negatives]
    pos_rows = np.flatnonzero(positive)
    lo = np.searchsorted(neg_sorted, scores[pos_rows], side="left")
    hi = np.searchsorted(neg_sorted, scores[pos_rows], side="right")
    return negatives.astype(np.int64), pos_rows.astype(np.int64), lo.astype(np.int32), hi.astype(np.int32)


def cindex_pairs(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(concordant, comparable) float64 [N, N] with lifelines' rules (row i's event, time and risk against j's)."""
    time, risk = np.asarray(time, np.float64), np.asarray(risk, np.float64)
    event = np.asarray(event, bool)
    ti, tj = time[:, None], time[None, :]
    comparable = event[:, None] & ((tj > ti) | ((tj == ti) & ~event[None, :]))
    ri, rj = risk[:, None], risk[None, :]
    return comparable * ((ri > rj) + 0.5 * (ri == rj)), comparable.astype(np.float64)
