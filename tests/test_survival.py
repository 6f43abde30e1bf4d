"""Survival: the Cox loss against torchsurv's negative partial log-likelihood (no ties, Breslow, Efron; padding rows
ignored), the c-index against lifelines and scikit-survival, NLL-surv on a hand-computed case, PORPOISE's bins
against pandas qcut/cut, and learning checks on synthetic bags with a known hazard (c-index >= 0.8)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import torch

from gpfm_jax.evaluation import bags, survival
from gpfm_jax.evaluation.mil_models import MILConfig
from gpfm_jax.evaluation.mil_train import Targets, TrainConfig, train_mil


def _torchsurv(log_hz, event, time, ties):
    from torchsurv.loss.cox import neg_partial_log_likelihood

    with pytest.warns(UserWarning, match="Ties") if ties != "none" else _nothing():
        return float(neg_partial_log_likelihood(torch.tensor(log_hz, dtype=torch.float64), torch.tensor(event),
                                                torch.tensor(time, dtype=torch.float64),
                                                ties_method=ties if ties != "none" else "efron", reduction="mean"))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("ties", ["none", "breslow", "efron"])
def test_cox_loss_matches_torchsurv(ties):
    rng = np.random.default_rng(0)
    n = 40
    log_hz = rng.standard_normal(n)
    event = rng.random(n) < 0.6
    time = rng.exponential(1.0, n) if ties == "none" else rng.integers(1, 8, n).astype(np.float64)
    if ties != "none":
        time[event] = np.sort(time[event])  # plenty of tied event times
    want = _torchsurv(log_hz, event, time, ties)
    # Padding rows (valid=False) with wild values must not change anything.
    pad = 7
    lh = np.concatenate([log_hz, rng.standard_normal(pad) * 50])
    tm = np.concatenate([time, np.zeros(pad)])
    ev = np.concatenate([event, np.ones(pad, bool)])
    valid = np.arange(n + pad) < n
    got = float(survival.cox_loss(jnp.asarray(lh, jnp.float32), jnp.asarray(tm, jnp.float32), jnp.asarray(ev),
                                  jnp.asarray(valid), "breslow" if ties == "none" else ties))
    print(f"Cox ({ties}) vs torchsurv: {abs(got - want):.2e} (value {want:.4f})")
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_concordance_index_matches_lifelines_and_sksurv():
    from lifelines.utils import concordance_index as lifelines_c
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(1)
    n = 300
    time = rng.exponential(1.0, n)
    event = rng.random(n) < 0.5
    risk = np.round(rng.standard_normal(n) - time, 1)  # rounded: many tied predictions (count 1/2)
    got = survival.concordance_index(time, risk, event)
    assert got == pytest.approx(lifelines_c(time, -risk, event), abs=1e-12)
    assert got == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-12)
    # Tied times: comparable only when exactly one of the pair had the event (lifelines' rule).
    time_t = np.round(time, 1)
    assert survival.concordance_index(time_t, risk, event) == pytest.approx(lifelines_c(time_t, -risk, event),
                                                                            abs=1e-12)
    assert np.isnan(survival.concordance_index(time, risk, np.zeros(n, bool)))


def test_nll_surv_hand_computed():
    logits = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]], np.float32)
    h = 1 / (1 + np.exp(-logits.astype(np.float64)))
    s = np.cumprod(1 - h, 1)
    # Slide 0: event in bin 1 -> -log S(0) - log h(1); slide 1: censored in bin 2 -> -log S(2).
    want0 = -np.log(s[0, 0]) - np.log(h[0, 1])
    want1 = -np.log(s[1, 2])
    got = survival.nll_surv_loss(jnp.asarray(logits), jnp.array([1, 2]), jnp.array([1, 0]), jnp.ones(2))
    assert float(got) == pytest.approx((want0 + want1) / 2, rel=1e-6)
    got_a = survival.nll_surv_loss(jnp.asarray(logits), jnp.array([1, 2]), jnp.array([1, 0]), jnp.ones(2), 0.4)
    assert float(got_a) == pytest.approx((want0 + 0.6 * want1) / 2, rel=1e-6)  # alpha adds 0.4 x uncensored
    risk = np.asarray(survival.nll_surv_risk(jnp.asarray(logits)))
    np.testing.assert_allclose(risk, -s.sum(1), rtol=1e-6)


def test_bins_match_porpoise_pandas_recipe():
    rng = np.random.default_rng(2)
    time = np.round(rng.exponential(30.0, 200), 1)
    event = rng.random(200) < 0.4
    patients = [f"p{i // 2}" for i in range(200)]  # two slides per patient
    time[1::2], event[1::2] = time[::2], event[::2]
    edges = survival.bin_edges(time, event, patients, 4)
    df = pd.DataFrame({"case_id": patients, "t": time, "c": 1 - event.astype(int)}).drop_duplicates(["case_id"])
    _, q = pd.qcut(df[df["c"] < 1]["t"], q=4, retbins=True, labels=False)
    q[-1], q[0] = time.max() + 1e-6, time.min() - 1e-6
    labels, _ = pd.cut(pd.Series(time), bins=q, retbins=True, labels=False, right=False, include_lowest=True)
    np.testing.assert_allclose(edges, q)
    np.testing.assert_array_equal(survival.discretise(time, edges), labels.to_numpy())


def _survival_bags(num: int, dim: int, seed: int):
    """Bag i hides 8 tumour-like tiles (shifted 4 sd along direction u) whose grade s_i ~ U(0, 3) shifts them
    along a second direction v; hazard = exp(2.5 s_i) (exponential times), ~50% random censoring. The true
    log-hazard reaches a c-index of ~0.87 on such data."""
    rng = np.random.default_rng(seed)
    u, v = np.linalg.qr(np.random.default_rng(200).standard_normal((dim, 2)))[0].T
    xs, lh = [], []
    for _ in range(num):
        n = int(rng.integers(30, 200))
        s = rng.uniform(0.0, 3.0)
        x = rng.standard_normal((n, dim)).astype(np.float32)
        x[rng.choice(n, 8, replace=False)] += 4.0 * u + s * v
        xs.append(x)
        lh.append(2.5 * s)
    lh = np.array(lh)
    t = rng.exponential(1.0 / np.exp(lh))
    c = rng.exponential(2.0 * np.median(t), num)
    return xs, np.minimum(t, c), t <= c, lh


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nll_surv", "cox"])
def test_survival_learning_reaches_cindex(loss):
    xs, time, event, true_lh = _survival_bags(400, 16, seed=3)
    sizes = np.array([len(x) for x in xs])
    buckets = bags.bucket_sizes(int(sizes.max()), 256, 1.5, 64)  # one bucket: one compile per step kind
    idx = np.arange(400)
    train, val, test = idx[:240], idx[240:280], idx[280:]
    tgt = Targets(time=time, event=event.astype(np.int32))
    outputs = 1
    if loss == "nll_surv":
        edges = survival.bin_edges(time[train], event[train], None, 4)
        tgt.bins = survival.discretise(time, edges)
        outputs = 4
    model_cfg = MILConfig("abmil", num_outputs=outputs, hidden_dim=32, attention_dim=16, dropout=0.25)
    cfg = TrainConfig(loss=loss, learning_rate=2e-3, epochs=25, patience=8, bucket_min=256)
    trained = train_mil(list(xs), sizes, tgt, train, val, model_cfg, cfg, 16, buckets)
    logits, _ = trained.model.predict(list(xs), test, buckets)
    risk = logits[:, 0] if loss == "cox" else np.asarray(survival.nll_surv_risk(jnp.asarray(logits, jnp.float32)))
    c = survival.concordance_index(time[test], risk, event[test])
    oracle = survival.concordance_index(time[test], true_lh[test], event[test])
    print(f"{loss}: c-index {c:.3f} (true log-hazard {oracle:.3f})")
    assert c >= 0.8, (c, oracle)
