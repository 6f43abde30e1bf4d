"""gpfm-bench's vectorised bootstrap metrics against scikit-learn / scikit-survival / lifelines on explicit resamples
(the resampled rows gathered and scored the plain way), the ranking statistics against scipy / scikit-posthocs, and
SimpleShot against scikit-learn's NearestCentroid."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require
from gpfm_jax.encoder_bench import bootstrap as bs
from gpfm_jax.encoder_bench import ranking, stats, weighted
from gpfm_jax.evaluation import metrics as eval_metrics
from gpfm_jax.evaluation import survival as eval_survival

TOL = 2e-6  # float32 sums of integer weights (exact) divided once: the metrics agree to float32 rounding


def _cohort(seed: int, n: int = 240, units: int = 50, classes: int = 3, encoders: int = 3, folds: int = 1):
    """Rows with several per patient, scores with ties, survival times with ties, folds grouped by patient."""
    rng = np.random.default_rng(seed)
    unit = np.concatenate([np.arange(units), rng.integers(0, units, n - units)])
    y = rng.integers(0, classes, n)
    logits = 1.5 * np.eye(classes)[y][None] + rng.standard_normal((encoders, n, classes))
    proba = np.exp(logits) / np.exp(logits).sum(2, keepdims=True)
    proba[0] = np.round(proba[0], 1)  # encoder 0: coarse scores, many ties (like kNN votes)
    proba[0] /= proba[0].sum(1, keepdims=True)
    z = rng.standard_normal(n)
    time = np.round(rng.exponential(np.exp(-z)) * 4) + 1  # tied times
    event = rng.random(n) < 0.65
    risk = 0.8 * z[None] + rng.standard_normal((encoders, n))
    risk[1] = np.round(risk[1])  # tied risks
    group = unit % folds
    return dict(unit=unit, y=y, proba=proba, time=time, event=event, risk=risk, group=group)


def _sklearn(metric: str, y, proba, time=None, event=None, risk=None) -> float:
    from sklearn import metrics as skm

    if metric == "accuracy":
        return skm.accuracy_score(y, proba.argmax(1))
    if metric == "balanced_accuracy":
        return skm.balanced_accuracy_score(y, proba.argmax(1))
    if metric == "macro_f1":
        return skm.f1_score(y, proba.argmax(1), average="macro")
    if metric == "auc":
        if proba.shape[1] == 2:
            return skm.roc_auc_score(y, proba[:, 1])
        return skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=np.arange(proba.shape[1]))
    raise ValueError(metric)


def _rows(seed: int, task: str, replicate: int, unit: np.ndarray) -> np.ndarray:
    """The resampled multiset of rows of one replicate, gathered explicitly."""
    counts = bs.replicate_counts(seed, task, replicate, int(unit.max()) + 1)
    return np.repeat(np.arange(len(unit)), counts[unit])


@pytest.mark.parametrize("classes", [2, 3])
def test_class_metrics_equal_sklearn_on_explicit_resamples(classes):
    require("sklearn")
    d = _cohort(0, classes=classes)
    tasks = [bs.TaskPredictions(f"t-{m}", m, d["unit"], np.zeros(240, np.int64), d["proba"], y=d["y"])
             for m in ("accuracy", "balanced_accuracy", "macro_f1", "auc")]
    res = bs.bootstrap_metrics(tasks, 40, seed=7)
    checked = 0
    for t, task in enumerate(tasks):
        for r in (-1, 0, 13, 39):
            rows = np.arange(240) if r < 0 else _rows(7, task.name, r, d["unit"])
            if len(np.unique(d["y"][rows])) < classes:
                continue  # sklearn's OvR AUC refuses an absent class (our mean leaves it out; tested below)
            for e in range(3):
                got = res.observed[t, e] if r < 0 else res.replicates[r, t, e]
                assert got == pytest.approx(_sklearn(task.metric, d["y"][rows], d["proba"][e, rows]), abs=TOL)
                checked += 1
    assert checked >= 40


def test_binary_auc_equals_sklearn_sample_weight():
    """The weights view: AUC under the replicate's counts as sample weights (no rows gathered)."""
    require("sklearn")
    from sklearn.metrics import roc_auc_score

    d = _cohort(1, classes=2)
    task = bs.TaskPredictions("w", "auc", d["unit"], np.zeros(240, np.int64), d["proba"], y=d["y"])
    res = bs.bootstrap_metrics([task], 10, seed=3)
    for r in range(10):
        w = bs.replicate_counts(3, "w", r, 50)[d["unit"]]
        for e in range(3):
            ref = roc_auc_score(d["y"], d["proba"][e, :, 1], sample_weight=w)
            assert res.replicates[r, 0, e] == pytest.approx(ref, abs=TOL)


def test_cindex_equals_sksurv_and_lifelines_on_explicit_resamples():
    require("sksurv")
    require("lifelines")
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_censored

    d = _cohort(2)
    task = bs.TaskPredictions("surv", "c_index", d["unit"], np.zeros(240, np.int64), d["risk"], time=d["time"],
                              event=d["event"])
    res = bs.bootstrap_metrics([task], 30, seed=5)
    for r in (-1, 0, 11, 29):
        rows = np.arange(240) if r < 0 else _rows(5, "surv", r, d["unit"])
        for e in range(3):
            got = res.observed[0, e] if r < 0 else res.replicates[r, 0, e]
            t, ev, risk = d["time"][rows], d["event"][rows], d["risk"][e, rows]
            assert got == pytest.approx(concordance_index_censored(ev, t, risk)[0], abs=TOL)
            assert got == pytest.approx(concordance_index(t, -risk, ev), abs=TOL)


def test_folds_average_as_gpfm_eval_and_values_are_weighted_means():
    """A task's value is the mean over its folds of the fold's metric (gpfm-eval mil's summary); per-row values
    (retrieval) are weighted means; undefined folds (one class / no comparable pair) are left out."""
    d = _cohort(3, folds=4, classes=2)
    y = d["y"].copy()
    y[d["group"] == 3] = 1  # fold 3: positives only -> its AUC is undefined
    values = (np.random.default_rng(0).random((3, 240)) < 0.4).astype(np.float64)
    tasks = [bs.TaskPredictions("auc", "auc", d["unit"], d["group"], d["proba"], y=y),
             bs.TaskPredictions("bacc", "balanced_accuracy", d["unit"], d["group"], d["proba"], y=y),
             bs.TaskPredictions("cidx", "c_index", d["unit"], d["group"], d["risk"], time=d["time"],
                                event=d["event"]),
             bs.TaskPredictions("acc@1", "acc@1", d["unit"], d["group"], values)]
    res = bs.bootstrap_metrics(tasks, 5, seed=1)
    for e in range(3):
        folds = [np.flatnonzero(d["group"] == g) for g in range(4)]
        aucs = [eval_metrics.auc(y[f], d["proba"][e, f]) for f in folds]
        assert np.isnan(aucs[3])
        assert res.observed[0, e] == pytest.approx(np.nanmean(aucs), abs=TOL)
        bacc = [eval_metrics.classification_metrics(y[f], d["proba"][e, f])["balanced_accuracy"] for f in folds]
        assert res.observed[1, e] == pytest.approx(np.mean(bacc), abs=TOL)
        cidx = [eval_survival.concordance_index(d["time"][f], d["risk"][e, f], d["event"][f]) for f in folds]
        assert res.observed[2, e] == pytest.approx(np.mean(cidx), abs=TOL)
        assert res.observed[3, e] == pytest.approx(np.mean([values[e, f].mean() for f in folds]), abs=TOL)
    for r in range(5):  # replicate r of the retrieval task, by hand
        w = bs.replicate_counts(1, "acc@1", r, 50)[d["unit"]]
        ref = [np.sum(w[f] * values[:, f], 1) / w[f].sum() for f in folds if w[f].sum() > 0]
        np.testing.assert_allclose(res.replicates[r, 3], np.mean(ref, 0), atol=TOL)


def test_a_task_resample_ignores_other_tasks_and_batch_size():
    d = _cohort(4)
    a = bs.TaskPredictions("a", "auc", d["unit"], np.zeros(240, np.int64), d["proba"], y=d["y"])
    b = bs.TaskPredictions("b", "c_index", d["unit"], np.zeros(240, np.int64), d["risk"], time=d["time"],
                           event=d["event"])
    alone = bs.bootstrap_metrics([a], 20, seed=2)
    both = bs.bootstrap_metrics([b, a], 20, seed=2, budget=2**12)  # another batch size
    assert both.batch != alone.batch
    np.testing.assert_array_equal(alone.replicates[:, 0], both.replicates[:, 1])
    other_seed = bs.bootstrap_metrics([a], 20, seed=3)
    assert not np.array_equal(alone.replicates, other_seed.replicates)


def test_auc_layout_and_blocked_cumsum():
    scores = np.array([0.3, 0.1, 0.3, 0.9, 0.1, 0.5, 0.3])
    pos = np.array([1, 0, 0, 1, 1, 0, 0], bool)
    neg, p, lo, hi = weighted.auc_layout(scores, pos)
    np.testing.assert_array_equal(scores[neg], [0.1, 0.3, 0.3, 0.5])
    np.testing.assert_array_equal(p, [0, 3, 4])
    np.testing.assert_array_equal(lo, [1, 4, 0])  # negatives strictly below 0.3, 0.9, 0.1
    np.testing.assert_array_equal(hi, [3, 4, 1])  # ... at or below
    x = np.random.default_rng(0).integers(0, 5, (256, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(weighted.cumsum(x)), np.cumsum(x, 0))


def test_ranks_average_rank_first_and_wins():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    v = np.round(rng.random((50, 7, 4)), 1)  # many ties
    np.testing.assert_array_equal(ranking.task_ranks(v), rankdata(-v, method="average", axis=-1))
    v[0, 2] = np.nan  # a task undefined in replicate 0 is left out of its average
    avg = ranking.average_rank(v)
    np.testing.assert_allclose(avg[0], rankdata(-np.delete(v[0], 2, 0), axis=-1).mean(0))
    assert ranking.first_share(np.array([1.5, 1.5, 3.0])).tolist() == [0.5, 0.5, 0.0]
    won = ranking.wins(np.array([[0.9, 0.9, 0.1], [0.2, 0.8, 0.8], [0.7, 0.1, 0.2]]))
    assert won.tolist() == [1.5, 1.0, 0.5]
    r = ranking.rank_encoders(list("abcd"), v[0], v)
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_allclose((r.win_prob + r.win_prob.T)[off], 1.0)
    assert r.p_first.sum() == pytest.approx(1.0)


def test_nemenyi_equals_scikit_posthocs_and_demsar():
    sp = require("scikit_posthocs")
    from scipy.stats import friedmanchisquare

    rng = np.random.default_rng(1)
    values = rng.random((24, 6)) + np.linspace(0.3, 0, 6)
    n = stats.nemenyi(values)
    ref = sp.posthoc_nemenyi_friedman(-values).to_numpy()
    np.testing.assert_allclose(n.p_values, ref, rtol=1e-9, atol=1e-12)
    # Demsar (2006), Table 5a: q_0.05 = 2.850 for k = 6 classifiers
    assert n.cd == pytest.approx(2.850 * np.sqrt(6 * 7 / (6.0 * 24)), abs=1e-3)
    assert n.friedman_stat == pytest.approx(friedmanchisquare(*values.T).statistic)
    ranks = n.avg_rank  # no ties: chi2 = 12 N / (k (k + 1)) [sum R_j^2 - k (k + 1)^2 / 4]
    assert n.friedman_stat == pytest.approx(12 * 24 / 42 * (np.sum(ranks**2) - 6 * 49 / 4))
    # cliques: maximal runs of average ranks within the CD (not significantly different)
    assert stats.cliques(np.array([1.0, 1.5, 2.2, 4.0]), 1.3) == [[0, 1, 2]]
    assert stats.cliques(np.array([4.0, 1.5, 2.2, 1.0]), 2.0) == [[3, 1, 2], [2, 0]]


def test_simpleshot_equals_nearest_centroid():
    require("sklearn")
    from sklearn.neighbors import NearestCentroid

    from gpfm_jax.evaluation.fewshot import cl2n, sample_support, simpleshot_scores

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    x = rng.standard_normal((300, 16)) + 1.2 * np.eye(4, 16)[y]
    support = sample_support(y[:200], 5, np.random.default_rng(1), 4)
    assert np.bincount(y[support], minlength=4).tolist() == [5, 5, 5, 5]
    s, q = cl2n(x[support], x[200:])
    ref = NearestCentroid().fit(s, y[support]).predict(q)
    proba = simpleshot_scores(x[support], y[support], x[200:], 4)
    np.testing.assert_array_equal(proba.argmax(1), ref)
    np.testing.assert_allclose(proba.sum(1), 1.0)
