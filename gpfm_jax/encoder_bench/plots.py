"""The report's pictures (matplotlib, Agg; each PNG written under a temporary name and renamed).

- `ranking_plot`: each encoder's average rank with its bootstrap 95% interval, P(first) beside it;
- `cd_diagram`: Demsar's critical-difference diagram (average ranks on an axis, the CD as a bar, encoders not
  significantly different by Nemenyi joined by a line). Drawn here because the libraries that draw one
  (scikit-posthocs, autorank) would bring pandas, seaborn and statsmodels into the runtime for ~50 lines;
- `win_matrix`: the pairwise win probabilities as a heatmap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpfm_jax.encoder_bench.ranking import Ranking
from gpfm_jax.encoder_bench.stats import Nemenyi, cliques


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def ranking_plot(r: Ranking, path: Path) -> None:
    plt = _plt()
    order = r.order()
    k = len(order)
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * k + 1.2))
    y = np.arange(k)[::-1]
    avg = r.avg_rank[order]
    lo, hi = r.avg_rank_ci[order, 0], r.avg_rank_ci[order, 1]
    ax.errorbar(avg, y, xerr=[avg - lo, hi - avg], fmt="o", color="#1f4e79", ecolor="#7aa6d6", capsize=4, lw=2)
    for i, e in enumerate(order):
        ax.annotate(f"P(first) {r.p_first[e]:.2f}", (hi[i], y[i]), xytext=(8, -3),
                    textcoords="offset points", fontsize=8, color="#444")
    ax.set_yticks(y, [r.encoders[e] for e in order])
    ax.set_xlim(0.8, len(r.encoders) + 0.9)
    ax.set_xlabel(f"average rank over {r.num_tasks} tasks (1 = best), 95% bootstrap CI ({r.num_replicates} reps)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def cd_diagram(cd: Nemenyi, encoders: list[str], path: Path) -> None:
    plt = _plt()
    k = len(encoders)
    order = np.argsort(cd.avg_rank)
    half = (k + 1) // 2
    fig, ax = plt.subplots(figsize=(7.0, 1.5 + 0.32 * half))
    ax.set_xlim(0.5, k + 0.5)
    ax.set_ylim(-(half + 0.6), 2.2)
    ax.axis("off")
    ax.hlines(0, 1, k, color="k", lw=1)
    for i in range(1, k + 1):
        ax.vlines(i, 0, 0.18, color="k", lw=1)
        ax.text(i, 0.3, str(i), ha="center", va="bottom", fontsize=9)
    if np.isfinite(cd.cd):
        ax.hlines(1.4, 1, 1 + cd.cd, color="k", lw=2)
        ax.vlines([1, 1 + cd.cd], 1.3, 1.5, color="k", lw=1)
        ax.text(1 + cd.cd / 2, 1.6, f"CD = {cd.cd:.2f}", ha="center", fontsize=9)
    for j, e in enumerate(order):
        r = cd.avg_rank[e]
        left = j < half
        row = -(j if left else k - 1 - j) - 1.0
        x_text = 0.6 if left else k + 0.4
        ax.plot([r, r, x_text], [0, row, row], color="#333", lw=0.8)
        ax.text(x_text + (-0.05 if left else 0.05), row, f"{encoders[e]} ({r:.2f})", ha="right" if left else "left",
                va="center", fontsize=9)
    for n, clique in enumerate(cliques(cd.avg_rank, cd.cd) if np.isfinite(cd.cd) else []):
        rs = cd.avg_rank[clique]
        ax.hlines(-0.3 - 0.16 * n, rs.min() - 0.06, rs.max() + 0.06, color="#c0392b", lw=3)
    fried = f"; Friedman p = {cd.friedman_p:.2g}" if cd.friedman_p is not None else ""
    ax.set_title(f"Nemenyi, alpha = {cd.alpha}, {cd.num_tasks} tasks{fried}", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def win_matrix(r: Ranking, path: Path) -> None:
    plt = _plt()
    order = r.order()
    m = r.win_prob[np.ix_(order, order)]
    names = [r.encoders[e] for e in order]
    k = len(order)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * k, 0.8 + 0.65 * k))
    im = ax.imshow(np.nan_to_num(m, nan=0.5), cmap="RdBu", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if i != j:
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(m[i, j] - 0.5) > 0.35 else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_title("P(row ranks above column)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)
    plt.close(fig)
