#!/usr/bin/env python
"""Times gpfm-bench's joint paired bootstrap: 1,000 replicates over a 72-task x 6-encoder synthetic suite (target:
under a minute on the 2-core CPU machine), and, side by side in the same run, the same resamples computed the plain
way (per replicate: gather the resampled rows, score them with gpfm_jax.evaluation's NumPy metrics) on a subset of
replicates, extrapolated to 1,000.

    python tools/bench_ranking.py [--replicates 1000] [--tasks-per-type 12] [--encoders 6] [--reference-reps 5]

The suite mirrors GPFM's mix: six task types, 12 each, sizes drawn log-uniform:
- tile linear probe (balanced accuracy) and tile kNN (one-vs-rest AUC): 300-8000 test tiles, 2-9 classes, half of
  the tasks with 20 tiles per patient, half with every tile its own unit; one fixed split;
- few-shot (balanced accuracy): 200-2000 test tiles, 10 episodes (groups);
- retrieval (acc@1 per query): 200-3000 queries;
- slide MIL (AUC): 100-1000 slides in 5 folds, 2-4 classes, ~1.1 slides per patient;
- survival (c-index): 100-1000 patients in 5 folds, ~30% censored.
Encoder e (0 = best) predicts with signal 1.6 - 0.2 e, so the true order is 0, 1, ..., 5.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from gpfm_jax.encoder_bench.bootstrap import TaskPredictions, bootstrap_metrics, replicate_counts  # noqa: E402
from gpfm_jax.encoder_bench.ranking import rank_encoders  # noqa: E402

TYPES = ("linear", "knn", "fewshot", "retrieval", "mil", "survival")


def _loguniform(rng, lo, hi) -> int:
    return int(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def synthetic_tasks(tasks_per_type: int = 12, encoders: int = 6, seed: int = 0) -> list[TaskPredictions]:
    rng = np.random.default_rng(seed)
    signal = 1.6 - 0.2 * np.arange(encoders)
    out = []
    for kind in TYPES:
        for i in range(tasks_per_type):
            name = f"{kind}-{i:02d}"
            if kind in ("linear", "knn", "fewshot"):
                n = _loguniform(rng, 300, 8000) if kind != "fewshot" else _loguniform(rng, 200, 2000)
                c = int(rng.integers(2, 10))
                y = rng.integers(0, c, n)
                units = np.arange(n) // 20 if i % 2 == 0 else np.arange(n)
                groups = np.zeros(n, np.int64)
                if kind == "fewshot":  # 10 episodes, each predicting every test tile
                    y, units = np.tile(y, 10), np.tile(units, 10)
                    groups = np.repeat(np.arange(10), n)
                logits = signal[:, None, None] * np.eye(c)[y][None] + rng.standard_normal((encoders, len(y), c))
                if kind == "knn":  # kNN votes: coarse scores, many ties
                    logits = np.round(logits, 1)
                metric = "auc" if kind == "knn" else "balanced_accuracy"
                out.append(TaskPredictions(name, metric, units, groups, _softmax(logits), y=y, num_classes=c))
            elif kind == "retrieval":
                n = _loguniform(rng, 200, 3000)
                p_hit = 1 / (1 + np.exp(-(signal - 1.0)))
                values = (rng.random((encoders, n)) < p_hit[:, None]).astype(np.float64)
                out.append(TaskPredictions(name, "acc@1", np.arange(n), np.zeros(n, np.int64), values))
            elif kind == "mil":
                n = _loguniform(rng, 100, 1000)
                c = int(rng.integers(2, 5))
                y = rng.integers(0, c, n)
                units = (np.arange(n) / 1.1).astype(np.int64)
                logits = 0.6 * signal[:, None, None] * np.eye(c)[y][None] + rng.standard_normal((encoders, n, c))
                out.append(TaskPredictions(name, "auc", units, np.arange(n) % 5, _softmax(logits), y=y, num_classes=c))
            else:
                n = _loguniform(rng, 100, 1000)
                z = rng.standard_normal(n)
                t = rng.exponential(np.exp(-z))
                event = rng.random(n) > 0.3
                risk = 0.5 * signal[:, None] * z[None] + rng.standard_normal((encoders, n))
                out.append(TaskPredictions(name, "c_index", np.arange(n), np.arange(n) % 5, risk, time=t,
                                           event=event))
    return out


def reference_metric(task: TaskPredictions, e: int, rows: np.ndarray) -> float:
    """The plain way: the resampled rows, scored by gpfm_jax.evaluation (NumPy), mean over groups."""
    from gpfm_jax.evaluation import metrics, survival

    vals = []
    for g in np.unique(task.groups):
        r = rows[task.groups[rows] == g]
        if len(r) == 0:
            continue
        if task.metric == "c_index":
            vals.append(survival.concordance_index(task.time[r], task.scores[e, r], task.event[r]))
        elif task.metric in ("auc", "balanced_accuracy"):
            vals.append(metrics.classification_metrics(task.y[r], task.scores[e, r])[task.metric])
        else:
            vals.append(task.scores[e, r].mean())
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicates", type=int, default=1000)
    p.add_argument("--tasks-per-type", type=int, default=12)
    p.add_argument("--encoders", type=int, default=6)
    p.add_argument("--reference-reps", type=int, default=5, help="replicates timed the plain way")
    p.add_argument("--profile", action="store_true", help="also time each metric family's compiled step")
    args = p.parse_args(argv)
    tasks = synthetic_tasks(args.tasks_per_type, args.encoders)
    rows = sum(len(t.units) for t in tasks)
    print(f"{len(tasks)} tasks x {args.encoders} encoders, {rows} prediction rows; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")

    t0, c0 = time.perf_counter(), time.process_time()
    boot = bootstrap_metrics(tasks, args.replicates, seed=0)
    t1 = time.perf_counter()
    ranking = rank_encoders([f"enc{e}" for e in range(args.encoders)], boot.observed, boot.replicates)
    t2, c2 = time.perf_counter(), time.process_time()
    boot2 = bootstrap_metrics(tasks, args.replicates, seed=1)  # programs compiled: the steady-state cost
    t3, c3 = time.perf_counter(), time.process_time()
    print(f"vectorised: {args.replicates} replicates {t1 - t0:.1f} s (first call, {boot.batch} replicates per step; "
          f"compile included), ranking {t2 - t1:.2f} s, total {t2 - t0:.1f} s wall, {c2 - c0:.1f} s CPU; again with "
          f"compiled programs {t3 - t2:.1f} s wall, {c3 - c2:.1f} s CPU (CPU = all threads of this process: a "
          f"figure the other jobs on the machine inflate less than wall time)")
    for e in ranking.order():
        lo, hi = ranking.avg_rank_ci[e]
        print(f"  {ranking.encoders[e]}: average rank {ranking.avg_rank[e]:.2f} [{lo:.2f}, {hi:.2f}], P(first) "
              f"{ranking.p_first[e]:.3f}, tasks won {ranking.tasks_won[e]:g}")

    # the plain way on the first few replicates, with the same resamples (checks agreement too)
    t4 = time.perf_counter()
    worst = 0.0
    for r in range(args.reference_reps):
        for k, task in enumerate(tasks):
            n_units = task.num_units
            counts = replicate_counts(1, task.name, r, n_units)
            resampled = np.repeat(np.arange(len(task.units)), counts.astype(np.int64)[task.units])
            for e in range(args.encoders):
                ref = reference_metric(task, e, resampled)
                if np.isfinite(ref):
                    worst = max(worst, abs(ref - boot2.replicates[r, k, e]))
    t5 = time.perf_counter()
    per_rep = (t5 - t4) / args.reference_reps
    print(f"plain (NumPy metrics on the gathered rows): {per_rep:.2f} s per replicate -> "
          f"{per_rep * args.replicates:.0f} s for {args.replicates} (extrapolated); "
          f"vectorised steady state {(t3 - t2):.1f} s: {per_rep * args.replicates / (t3 - t2):.0f}x faster, "
          f"first call {per_rep * args.replicates / (t2 - t0):.0f}x")
    print(f"max |vectorised - plain| over {args.reference_reps} replicates x {len(tasks)} tasks x {args.encoders} "
          f"encoders: {worst:.2e}")
    if args.profile:
        profile(tasks, boot.batch)
    return 0


def profile(tasks: list[TaskPredictions], batch: int) -> None:
    """CPU seconds per 1,000 replicates of each metric family's compiled step (one batch, timed 3 times)."""
    import jax
    import jax.numpy as jnp

    from gpfm_jax.encoder_bench import bootstrap as bs

    fams, _, dummy = bs._columns(tasks)
    counts = jnp.asarray(np.random.default_rng(0).poisson(1.0, (dummy + 1, batch)).astype(np.float32))
    classes = max(t.classes for t in tasks if t.family() == "class")
    for name, fam in fams.items():
        if not fam.items:
            continue
        arrays, owners = fam.stacked(dummy)
        dev = [{k: jnp.asarray(v) for k, v in a.items()} for a in arrays]
        step = lambda: jax.block_until_ready(bs._family_step(name, classes, dev, counts))  # noqa: E731
        step()
        c0 = time.process_time()
        for _ in range(3):
            step()
        cpu = (time.process_time() - c0) / 3 / batch * 1000
        print(f"  {name:<10} {sum(len(o) for o in owners):>5} columns in {len(arrays):>2} shapes: "
              f"{cpu:.1f} CPU s per 1000 replicates")


if __name__ == "__main__":
    sys.exit(main())
