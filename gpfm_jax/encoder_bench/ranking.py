"""From per-task metrics to the ranking and its uncertainty.

Per task the encoders are ranked (1 = best; every metric here is higher-is-better; ties share the average rank,
`scipy.stats.rankdata(method="average")` on the negated values); the average rank over tasks is the paper's summary
figure. Applied to every bootstrap replicate (`bootstrap.bootstrap_metrics`, all tasks resampled jointly and every
encoder scored on the same resample), it gives the distribution of the average rank, hence:
- a 95% percentile interval of each encoder's average rank;
- P(first): the share of replicates in which the encoder has the lowest average rank (k tied encoders share 1/k);
- the pairwise win probability P(avg rank of a < avg rank of b) (ties count 1/2);
- tasks won: per task, the encoders with the best value share the win (1/k each), summed over tasks.
A task whose metric is undefined in a replicate (e.g. no positive patient drawn) is left out of that replicate's
average; undefinedness depends only on labels and weights, so it is the same for every encoder.

Written in NumPy: [R, T, E] with E encoders costs R*T*E^2 comparisons (2.6 M for 1000 x 72 x 6), nothing next to
the metrics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gpfm_jax.encoder_bench.bootstrap import percentile_ci


def task_ranks(values: np.ndarray) -> np.ndarray:
    """[..., E] values -> [..., E] ranks (1 = highest value; ties averaged; nan ranks last, all-nan rows nan)."""
    v = np.where(np.isnan(values), -np.inf, values)
    greater = (v[..., None, :] > v[..., :, None]).sum(-1)  # others strictly better than me
    equal = (v[..., None, :] == v[..., :, None]).sum(-1) - 1
    ranks = 1.0 + greater + 0.5 * equal
    return np.where(np.isnan(values).all(-1, keepdims=True), np.nan, ranks)


def average_rank(values: np.ndarray) -> np.ndarray:
    """[..., T, E] -> [..., E]: the mean rank over the tasks that are defined."""
    ranks = task_ranks(values)
    ok = ~np.isnan(ranks)
    return np.where(ok, ranks, 0.0).sum(-2) / np.maximum(ok.sum(-2), 1)


def first_share(avg: np.ndarray) -> np.ndarray:
    """[..., E] average ranks -> [..., E] credit for being first (1/k among k tied at the minimum)."""
    best = avg == avg.min(-1, keepdims=True)
    return best / best.sum(-1, keepdims=True)


def wins(values: np.ndarray) -> np.ndarray:
    """[..., T, E] -> [..., E]: tasks won, a tie for the best value shared 1/k."""
    v = np.where(np.isnan(values), -np.inf, values)
    best = (v == v.max(-1, keepdims=True)) & ~np.isnan(values).all(-1, keepdims=True)
    return (best / np.maximum(best.sum(-1, keepdims=True), 1)).sum(-2)


@dataclasses.dataclass
class Ranking:
    encoders: list[str]
    avg_rank: np.ndarray  # [E] observed
    avg_rank_ci: np.ndarray  # [E, 2]
    p_first: np.ndarray  # [E]
    win_prob: np.ndarray  # [E, E]: P(row beats column); diagonal nan
    tasks_won: np.ndarray  # [E] observed (ties shared)
    tasks_won_ci: np.ndarray  # [E, 2]
    task_ranks: np.ndarray  # [T, E] observed
    num_tasks: int
    num_replicates: int

    def order(self) -> list[int]:
        """Encoders by observed average rank (then P(first))."""
        return sorted(range(len(self.encoders)), key=lambda e: (self.avg_rank[e], -self.p_first[e]))

    def to_json(self) -> dict:
        return {
            "encoders": self.encoders, "num_tasks": self.num_tasks, "num_replicates": self.num_replicates,
            "order": [self.encoders[e] for e in self.order()],
            "per_encoder": {name: {"avg_rank": float(self.avg_rank[e]), "avg_rank_ci95": self.avg_rank_ci[e].tolist(),
                                   "p_first": float(self.p_first[e]), "tasks_won": float(self.tasks_won[e]),
                                   "tasks_won_ci95": self.tasks_won_ci[e].tolist()}
                            for e, name in enumerate(self.encoders)},
            "win_probability": {a: {b: (None if i == j else float(self.win_prob[i, j]))
                                    for j, b in enumerate(self.encoders)} for i, a in enumerate(self.encoders)},
        }


def rank_encoders(encoders: list[str], observed: np.ndarray, replicates: np.ndarray, level: float = 0.95) -> Ranking:
    """observed [T, E], replicates [R, T, E] of each task's ranking metric -> the Ranking."""
    avg_obs = average_rank(observed)
    avg_rep = average_rank(replicates)  # [R, E]
    lower = (avg_rep[:, :, None] < avg_rep[:, None, :]).mean(0)
    tie = (avg_rep[:, :, None] == avg_rep[:, None, :]).mean(0)
    win = lower + 0.5 * tie
    np.fill_diagonal(win, np.nan)
    won_rep = wins(replicates)
    return Ranking(encoders=list(encoders), avg_rank=avg_obs, avg_rank_ci=percentile_ci(avg_rep, level),
                   p_first=first_share(avg_rep).mean(0), win_prob=win, tasks_won=wins(observed),
                   tasks_won_ci=percentile_ci(won_rep, level), task_ranks=task_ranks(observed),
                   num_tasks=int(observed.shape[0]), num_replicates=int(replicates.shape[0]))
