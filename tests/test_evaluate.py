"""gpfm-eval against scikit-learn and hand computations on small synthetic feature sets of known separability."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from gpfm_jax.evaluation import cli as evaluate
from gpfm_jax.evaluation import data
from gpfm_jax.evaluation.knn import knn_scores
from gpfm_jax.evaluation.linear import LinearProbeConfig, train_linear_probe
from gpfm_jax.evaluation.metrics import bootstrap, classification_metrics


def _blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int,
           centre_seed: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around random unit centres (fixed by centre_seed); `spread` sets the overlap."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(centre_seed).standard_normal((num_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + spread * rng.standard_normal((len(y), dim))
    return x.astype(np.float32), y


def test_knn_hand_computed():
    train = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32) * 3  # scale must not matter (L2 norm)
    labels = np.array([0, 0, 1, 1])
    test = np.array([[0.6, 0.8]], np.float32)
    sims = np.array([0.6, 0.96, 0.8, -0.6])  # cosine of test with each training row
    got = knn_scores(train, labels, test, 2, k=3, temperature=0.07)
    w = np.exp(sims[[1, 2, 0]] / 0.07)  # the 3 most similar
    want = np.array([w[0] + w[2], w[1]]) / w.sum()
    np.testing.assert_allclose(got[0], want, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_sklearn_weighted_cosine(k):
    x, y = _blobs(60, 3, 16, spread=0.45, seed=0)
    test_x, test_y = _blobs(30, 3, 16, spread=0.45, seed=1)
    t = 0.07
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / t)).fit(x, y)
    got = knn_scores(x, y, test_x, 3, k=k, temperature=t)
    np.testing.assert_allclose(got, ref.predict_proba(test_x), atol=1e-5)
    np.testing.assert_array_equal(got.argmax(1), ref.predict(test_x))
    assert 0.6 < np.mean(got.argmax(1) == test_y) < 1.0  # overlapping classes: neither trivial nor chance


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("num_classes", [2, 4])
def test_metrics_match_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    y = rng.integers(0, num_classes, 200)
    # Scores on a 0.1 grid (rows still sum to 1): many ties, which AUC must count as 1/2.
    pvals = np.full((200, num_classes), 1.0) + 3.0 * np.eye(num_classes)[y]
    proba = np.stack([rng.multinomial(10, p / p.sum()) for p in pvals]) / 10.0
    got = classification_metrics(y, proba)
    pred = proba.argmax(1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    want_auc = (skm.roc_auc_score(y, proba[:, 1]) if num_classes == 2
                else skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert got["auc"] == pytest.approx(want_auc)
    # A class never predicted, and one absent from y_true, are handled as sklearn does.
    pred_only = np.where(pred == 0, 1, pred)
    onehot = np.eye(num_classes)[pred_only]
    y_no_last = np.where(y == num_classes - 1, 0, y)
    got = classification_metrics(y_no_last, onehot)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_no_last, pred_only))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y_no_last, pred_only, average="macro"))


def test_bootstrap_is_seeded_and_matches_a_hand_loop():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    proba = rng.dirichlet(np.ones(3), 150) + 0.5 * np.eye(3)[y]
    proba /= proba.sum(1, keepdims=True)
    ci = bootstrap(y, proba, num_samples=200, seed=7)
    assert ci == bootstrap(y, proba, num_samples=200, seed=7)
    draws = np.random.default_rng(7)
    accs = []
    for _ in range(200):
        idx = draws.integers(0, 150, 150)
        accs.append(skm.accuracy_score(y[idx], proba[idx].argmax(1)))
    assert ci["accuracy"] == pytest.approx((np.percentile(accs, 2.5), np.percentile(accs, 97.5)))
    point = classification_metrics(y, proba)
    for m, (lo, hi) in ci.items():
        assert lo <= point[m] <= hi


def test_linear_probe_converges_to_sklearn_logistic_regression():
    x, y = _blobs(200, 3, 8, spread=0.6, seed=2)
    test_x, test_y = _blobs(100, 3, 8, spread=0.6, seed=3)
    cfg = LinearProbeConfig(learning_rate=0.05, weight_decay=0.0, epochs=400, batch_size=1000, patience=400)
    probe = train_linear_probe(x, y, x, y, 3, cfg)  # validated on its own training data: runs to the optimum
    mean, std = x.mean(0), x.std(0)
    ref = LogisticRegression(C=1e6, max_iter=10_000, tol=1e-10).fit((x - mean) / std, y)  # ~unregularised MLE
    got, want = probe.predict_proba(test_x), ref.predict_proba((test_x - mean) / std)
    assert np.abs(got - want).max() < 0.02, np.abs(got - want).max()
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
    assert 0.6 < np.mean(got.argmax(1) == test_y) < 1.0


def test_linear_probe_early_stopping_keeps_the_best_validation_epoch():
    rng = np.random.default_rng(4)
    x, val_x = rng.standard_normal((40, 100)).astype(np.float32), rng.standard_normal((40, 100)).astype(np.float32)
    y, val_y = np.arange(40) % 2, np.arange(40) % 2  # labels unrelated to the features: fitting them overfits
    x[:, 0] += 0.8 * (2 * y - 1)
    val_x[:, 0] += 0.8 * (2 * val_y - 1)  # one weakly informative feature, 99 noise ones
    cfg = LinearProbeConfig(learning_rate=0.05, weight_decay=0.0, epochs=500, patience=15)
    probe = train_linear_probe(x, y, val_x, val_y, 2, cfg)
    losses = [h["val_loss"] for h in probe.history]
    assert len(losses) < 500 and len(losses) == probe.best_epoch + 16  # stopped 15 epochs after the best
    assert probe.best_epoch == int(np.argmin(losses))
    p = probe.predict_proba(val_x)
    assert -np.mean(np.log(p[np.arange(40), val_y])) == pytest.approx(min(losses), rel=1e-4)


def _write_features(path, x, paths):
    with h5py.File(path, "w") as f:
        f["features"] = x
        f["paths"] = np.array(paths, dtype=h5py.string_dtype())


def test_cli_separable_classes_and_labels_from_csv_or_folders(tmp_path, capsys):
    x, y = _blobs(40, 2, 12, spread=0.05, seed=5)  # well separated: every method must be perfect
    names = np.array(["normal", "tumor"])[y]
    paths = [f"{c}/tile_{i:03d}.png" for i, c in enumerate(names)]
    _write_features(tmp_path / "f.h5", x, paths)
    out = tmp_path / "r.json"
    assert evaluate.main(["knn", "--train", str(tmp_path / "f.h5"), "--k", "5", "20", "--bootstrap", "50",
                          "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "balanced_accuracy" in text and "auc" in text and "[" in text
    res = json.loads(out.read_text())
    assert res["classes"] == ["normal", "tumor"] and res["sizes"] == {"train": 56, "test": 24}
    for k in ("k=5", "k=20"):
        assert res[k]["accuracy"]["value"] == 1.0 and res[k]["auc"]["value"] == 1.0
        assert res[k]["accuracy"]["ci95"] == [1.0, 1.0]
    assert evaluate.main(["linear", "--train", str(tmp_path / "f.h5"), "--bootstrap", "50", "--epochs", "50",
                          "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["linear"]["accuracy"]["value"] == 1.0 and res["linear"]["macro_f1"]["value"] == 1.0
    assert res["sizes"]["val"] > 0 and res["sizes"]["train"] + res["sizes"]["val"] == 56

    # Labels from a CSV keyed by file name (flipped names, so the CSV, not the folders, must be used).
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"tile_{i:03d}.png,{'B' if c == 'normal' else 'A'}\n"
                                            for i, c in enumerate(names) if i != 0))
    assert evaluate.main(["knn", "--train", str(tmp_path / "f.h5"), "--labels", str(csv), "--bootstrap", "0",
                          "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["classes"] == ["A", "B"] and sum(res["sizes"].values()) == 79  # the unlabelled row is left out
    assert res["k=20"]["accuracy"]["ci95"] is None

    # Bad input: no labels match, missing file.
    csv.write_text("path,label\nother.png,A\n")
    assert evaluate.main(["knn", "--train", str(tmp_path / "f.h5"), "--labels", str(csv)]) == 2
    assert "has a label" in capsys.readouterr().err
    assert evaluate.main(["knn", "--train", str(tmp_path / "missing.h5")]) == 2
    assert "not found" in capsys.readouterr().err


def test_stratified_split_keeps_every_class():
    y = np.array([0] * 10 + [1] * 3 + [2])
    keep, held = data.stratified_split(y, 0.3, seed=0)
    assert sorted(np.concatenate([keep, held])) == list(range(14))
    assert sorted(y[held].tolist()) == [0, 0, 0, 1] and 2 in y[keep]
