"""ROI retrieval against a direct computation: scikit-learn's StandardScaler + NearestNeighbors for the neighbours,
plain Python loops for the majority votes, hits and AP@5; the command line on tile-feature files with a split
column."""

from __future__ import annotations

import json
from collections import Counter

import h5py
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from gpfm_jax.evaluation import cli
from gpfm_jax.evaluation.retrieval import majority_vote, nearest, per_query, retrieval, zscore


def _data(seed: int, n_db: int = 300, n_q: int = 120, classes: int = 4, dim: int = 12):
    rng = np.random.default_rng(seed)
    centres = 1.2 * rng.standard_normal((classes, dim))
    scales = rng.uniform(0.5, 5.0, dim)  # unequal feature scales: z-scoring matters
    yd, yq = rng.integers(0, classes, n_db), rng.integers(0, classes, n_q)
    xd = (centres[yd] + rng.standard_normal((n_db, dim))) * scales + 10.0
    xq = (centres[yq] + rng.standard_normal((n_q, dim))) * scales + 10.0
    return xd.astype(np.float32), yd, xq.astype(np.float32), yq


def _reference(xd, yd, xq, yq):
    scaler = StandardScaler().fit(xd)  # ddof 0 vs our ddof 1: a common factor, the same neighbours
    nn = NearestNeighbors(n_neighbors=5).fit(scaler.transform(xd))
    idx = nn.kneighbors(scaler.transform(xq), return_distance=False)
    out = {f"{m}@{k}": [] for m in ("acc", "hit") for k in (1, 3, 5)}
    out["map@5"] = []
    for q, row in enumerate(idx):
        labels = [int(yd[j]) for j in row]
        for k in (1, 3, 5):
            counts = Counter(labels[:k])
            top = max(counts.values())
            vote = next(lab for lab in labels[:k] if counts[lab] == top)  # tie: nearest-ranked tied class
            out[f"acc@{k}"].append(vote == yq[q])
            out[f"hit@{k}"].append(yq[q] in labels[:k])
        rel = [lab == yq[q] for lab in labels]
        precisions = [sum(rel[: i + 1]) / (i + 1) for i in range(5) if rel[i]]
        out["map@5"].append(sum(precisions) / len(precisions) if precisions else 0.0)
    return idx, {k: float(np.mean(v)) for k, v in out.items()}


def test_retrieval_matches_sklearn_and_direct_loops():
    xd, yd, xq, yq = _data(0)
    db, q = zscore(xd, xq)
    np.testing.assert_allclose(db.std(0, ddof=1), 1.0, rtol=1e-9)
    want_idx, want = _reference(xd, yd, xq, yq)
    np.testing.assert_array_equal(nearest(db, q, 5), want_idx)
    got = retrieval(xd, yd, xq, yq, 4, bootstrap=200, seed=0)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k]["value"] == pytest.approx(v, abs=1e-12), k
        lo, hi = got[k]["ci95"]
        assert lo <= v <= hi
    assert 0.3 < got["acc@1"]["value"] < 1.0  # overlapping classes: neither trivial nor chance


def test_majority_vote_ties_and_map_by_hand():
    labels = np.array([[2, 1, 1, 2, 0], [0, 1, 2, 3, 3], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(majority_vote(labels[:, :4], 4), [2, 0, 1])  # 2-2 tie: the nearest (2); all 1s: 0
    np.testing.assert_array_equal(majority_vote(labels, 4), [2, 3, 0])
    v = per_query(labels, np.array([1, 3, 2]), 4)
    np.testing.assert_allclose(v["map@5"], [(1 / 2 + 2 / 3) / 2, (1 / 4 + 2 / 5) / 2, 0.0])
    np.testing.assert_array_equal(v["hit@3"], [1, 0, 0])


def _write(path, x, paths):
    with h5py.File(path, "w") as f:
        f["features"] = x
        f["paths"] = np.array(paths, dtype=h5py.string_dtype())


def test_cli_retrieval_with_split_column(tmp_path):
    xd, yd, xq, yq = _data(1, n_db=80, n_q=40, classes=3)
    x = np.concatenate([xd, xq])
    names = [f"t{i:03d}.png" for i in range(120)]
    _write(tmp_path / "f.h5", x, [f"roi/{n}" for n in names])
    y = np.concatenate([yd, yq])
    rows = [f"{n},{'abc'[c]},{'database' if i < 80 else 'query'}" for i, (n, c) in enumerate(zip(names, y))]
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    assert cli.main(["retrieval", "--features", str(tmp_path / "f.h5"), "--labels", str(tmp_path / "labels.csv"),
                     "--bootstrap", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    _, want = _reference(xd, yd, xq, yq)
    assert res["sizes"] == {"database": 80, "query": 40} and res["classes"] == ["a", "b", "c"]
    for k, v in want.items():
        assert res[k]["value"] == pytest.approx(v, abs=1e-12)
    # Without a split column: a stratified query split; a missing file is a clear error.
    (tmp_path / "l2.csv").write_text("path,label\n" + "\n".join(f"{n},{'abc'[c]}" for n, c in zip(names, y)))
    assert cli.main(["retrieval", "--features", str(tmp_path / "f.h5"), "--labels", str(tmp_path / "l2.csv"),
                     "--bootstrap", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sizes"] == {"database": 84, "query": 36}
    assert cli.main(["retrieval", "--features", str(tmp_path / "nope.h5")]) == 2
