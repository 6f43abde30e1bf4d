"""Survival objectives and the concordance index.

- Discrete-time NLL-surv (Zadeh & Schmid 2020 as used by PORPOISE / MCAT / CLAM-survival): times are cut into bins at
  the quantiles (quartiles by default) of the *uncensored* patients' times, bin edges widened to the min/max of all
  times; the model's K logits are per-bin hazards h = sigmoid(logit), S = cumprod(1 - h), risk = -sum(S).
- Cox partial likelihood over a minibatch of bags (Breslow or Efron ties), the mean over distinct event times as
  torchsurv's `neg_partial_log_likelihood(reduction="mean")`; the risk is the log-hazard itself.
- Harrell's c-index with lifelines' rules for ties (pairs tied in time count only when exactly one has the event;
  tied predictions count 1/2). It is NumPy here rather than `lifelines.utils.concordance_index` because lifelines is
  not a runtime dependency of gpfm_jax (it brings pandas, autograd, formulaic, matplotlib); the tests check it equals
  lifelines and scikit-survival.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------------------------- discretisation


def bin_edges(time: np.ndarray, event: np.ndarray, patients: list[str] | None = None, n_bins: int = 4,
              eps: float = 1e-6) -> np.ndarray:
    """PORPOISE's `pd.qcut(uncensored times, q=n_bins)` edges (one row per patient), with the outer edges set to the
    min - eps and max + eps of all times. Returns float64 [n_bins + 1]."""
    time, event = np.asarray(time, np.float64), np.asarray(event, bool)
    if patients is not None:  # drop_duplicates(['case_id']): the first slide of each patient
        _, first = np.unique(np.asarray(patients), return_index=True)
        first = np.sort(first)
        t_u = time[first][event[first]]
    else:
        t_u = time[event]
    if t_u.size == 0:
        raise ValueError("no uncensored times: survival bins need events")
    edges = np.quantile(t_u, np.linspace(0, 1, n_bins + 1))  # linear interpolation, as pandas qcut
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"survival bin edges are not distinct ({edges}); use fewer --survival-bins")
    edges[0], edges[-1] = time.min() - eps, time.max() + eps
    return edges


def discretise(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index per time, `pd.cut(..., right=False, include_lowest=True, labels=False)`: bin i = [e_i, e_i+1)."""
    return np.clip(np.searchsorted(edges, np.asarray(time, np.float64), side="right") - 1, 0, len(edges) - 2)


# --------------------------------------------------------------------------------------------- losses (JAX)


def nll_surv_loss(logits: jax.Array, bins: jax.Array, event: jax.Array, weights: jax.Array, alpha: float = 0.0,
                  eps: float = 1e-7) -> jax.Array:
    """Weighted mean discrete-time survival NLL. logits [B, K], bins int [B], event [B] (1 = observed).
    (1 - alpha) * (censored + uncensored) + alpha * uncensored, as MCAT's `nll_loss` (alpha 0 by default there)."""
    h = jax.nn.sigmoid(logits)
    s = jnp.cumprod(1.0 - h, axis=1)
    s_pad = jnp.concatenate([jnp.ones_like(s[:, :1]), s], axis=1)
    take = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]
    c = 1.0 - event.astype(logits.dtype)  # censorship
    unc = -(1.0 - c) * (jnp.log(jnp.maximum(take(s_pad, bins), eps)) + jnp.log(jnp.maximum(take(h, bins), eps)))
    cen = -c * jnp.log(jnp.maximum(take(s_pad, bins + 1), eps))
    per = (1.0 - alpha) * (cen + unc) + alpha * unc
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def nll_surv_risk(logits: jax.Array) -> jax.Array:
    """Risk score from bin hazards: -sum_k S_k (higher = shorter survival)."""
    return -jnp.sum(jnp.cumprod(1.0 - jax.nn.sigmoid(logits), axis=1), axis=1)


def cox_loss(log_hz: jax.Array, time: jax.Array, event: jax.Array, valid: jax.Array,
             ties: str = "breslow") -> jax.Array:
    """Negative Cox partial log-likelihood of a minibatch, mean over distinct event times (torchsurv's reduction).
    log_hz, time [B]; event, valid bool [B] (invalid rows = padding, outside every risk set). O(B^2) pairwise, which
    is exact and cheap for minibatches of bags. Zero when the batch has no event."""
    ev = event & valid
    at_risk = (time[None, :] >= time[:, None]) & valid[None, :]  # [i, j]: j at risk at t_i
    tied = ev[None, :] & (time[None, :] == time[:, None])  # [i, j]: j an event tied with i
    m = jnp.maximum(tied.sum(1), 1).astype(log_hz.dtype)  # events at t_i
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(valid, log_hz, -jnp.inf)))
    e = jnp.where(valid, jnp.exp(jnp.where(valid, log_hz - shift, 0.0)), 0.0)  # no overflow on padding
    denom = jnp.sum(jnp.where(at_risk, e[None, :], 0.0), axis=1)  # sum over the risk set of t_i
    if ties == "efron":
        order = jnp.arange(log_hz.shape[0])
        rank = jnp.sum(tied & (order[None, :] < order[:, None]), axis=1)  # r = 0..m-1 within each tie group
        tie_sum = jnp.sum(jnp.where(tied, e[None, :], 0.0), axis=1)
        denom = denom - rank / m * tie_sum
    elif ties != "breslow":
        raise ValueError(f"ties must be 'breslow' or 'efron', got {ties!r}")
    ll = log_hz - shift - jnp.log(jnp.where(ev, denom, 1.0))
    units = jnp.sum(jnp.where(ev, 1.0 / m, 0.0))  # distinct event times
    return -jnp.sum(jnp.where(ev, ll, 0.0)) / jnp.maximum(units, 1.0)


# --------------------------------------------------------------------------------------------- c-index (NumPy)


def concordance_index(time: np.ndarray, risk: np.ndarray, event: np.ndarray, chunk: int = 2048) -> float:
    """Harrell's C: over comparable pairs (i had the event and t_i < t_j, or t_i == t_j with j censored), the
    fraction where risk_i > risk_j, ties in risk counting 1/2. nan when no pair is comparable."""
    time = np.asarray(time, np.float64)
    risk = np.asarray(risk, np.float64)
    event = np.asarray(event, bool)
    idx = np.flatnonzero(event)
    num = den = 0.0
    for s in range(0, len(idx), chunk):
        i = idx[s : s + chunk]
        ti, ri = time[i, None], risk[i, None]
        comparable = (time[None, :] > ti) | ((time[None, :] == ti) & ~event[None, :])
        num += np.sum(comparable & (ri > risk[None, :])) + 0.5 * np.sum(comparable & (ri == risk[None, :]))
        den += np.sum(comparable)
    return float(num / den) if den else float("nan")
