"""Friedman test and Nemenyi critical difference over tasks (Demsar 2006), from scipy.

The tasks are the blocks, the encoders the treatments. Friedman: `scipy.stats.friedmanchisquare` (needs >= 3
encoders). Nemenyi: two encoders differ at level alpha when their average ranks differ by more than
CD = q_alpha / sqrt(2) * sqrt(k (k + 1) / (6 N)), q_alpha the upper quantile of the studentized range of k groups
with infinite degrees of freedom (`scipy.stats.studentized_range`); the pairwise p-values are the same
distribution's survival function, as scikit-posthocs' `posthoc_nemenyi_friedman` computes them (the tests compare).
scikit-posthocs itself is not used at run time: it pulls in pandas, seaborn and statsmodels for three lines of
scipy.

The critical-difference test treats each task's observed ranking as exact; the bootstrap in `ranking` is the
complement that carries the sampling noise of each task's test set.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats as sps

from gpfm_jax.encoder_bench.ranking import average_rank


@dataclasses.dataclass
class Nemenyi:
    avg_rank: np.ndarray  # [k] over the tasks used
    cd: float  # critical difference at alpha
    alpha: float
    p_values: np.ndarray  # [k, k] pairwise, diagonal 1
    friedman_stat: float | None
    friedman_p: float | None
    num_tasks: int

    def to_json(self, encoders: list[str]) -> dict:
        return {"alpha": self.alpha, "critical_difference": self.cd, "num_tasks": self.num_tasks,
                "friedman_chi2": self.friedman_stat, "friedman_p": self.friedman_p,
                "avg_rank": dict(zip(encoders, map(float, self.avg_rank))),
                "nemenyi_p": {a: dict(zip(encoders, map(float, row))) for a, row in zip(encoders, self.p_values)}}


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    q = sps.studentized_range.ppf(1.0 - alpha, k, np.inf) / np.sqrt(2.0)
    return float(q * np.sqrt(k * (k + 1) / (6.0 * n)))


def nemenyi(observed: np.ndarray, alpha: float = 0.05) -> Nemenyi:
    """observed [T, E] (higher is better); tasks with an undefined value for some encoder are left out."""
    values = observed[~np.isnan(observed).any(1)]
    n, k = values.shape
    if n == 0:
        raise ValueError("no task has a defined value for every encoder")
    avg = average_rank(values)
    diff = np.abs(avg[:, None] - avg[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        p = sps.studentized_range.sf(diff / np.sqrt(k * (k + 1) / (6.0 * n)) * np.sqrt(2.0), k, np.inf)
    np.fill_diagonal(p, 1.0)
    stat = pval = None
    if k >= 3 and n >= 2:
        res = sps.friedmanchisquare(*values.T)
        stat, pval = float(res.statistic), float(res.pvalue)
    return Nemenyi(avg, critical_difference(k, n, alpha) if k >= 2 else float("nan"), alpha, p, stat, pval, n)


def cliques(avg_rank: np.ndarray, cd: float) -> list[list[int]]:
    """Maximal groups of encoders (by average rank) whose spread is below the CD: the bars of a CD diagram."""
    order = np.argsort(avg_rank)
    r = avg_rank[order]
    out: list[list[int]] = []
    for i in range(len(r)):
        j = i
        while j + 1 < len(r) and r[j + 1] - r[i] <= cd:
            j += 1
        if j > i and not (out and order[j] in out[-1]):
            out.append([int(o) for o in order[i : j + 1]])
    return out
