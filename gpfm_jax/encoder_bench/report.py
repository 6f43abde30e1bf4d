"""`gpfm-bench report`: from a run's cells to per-task metrics with CIs, the ranking with its uncertainty, and the
Friedman / Nemenyi comparison. Nothing is retrained: every number is recomputed from the predictions in the cells.

Outputs in `<run>/report/` (each written under a temporary name and renamed): `report.md` (paper-style table),
`metrics.csv` (one row per task x metric x encoder), `report.json` (everything, incl. the win-probability matrix
and the Nemenyi p-values), `ranking.png`, `cd_diagram.png`, `win_probability.png`.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_jax.encoder_bench.bootstrap import TaskPredictions, bootstrap_metrics, percentile_ci
from gpfm_jax.encoder_bench.cache import read_json
from gpfm_jax.encoder_bench.ranking import Ranking, rank_encoders
from gpfm_jax.encoder_bench.run import RUN_FILE
from gpfm_jax.encoder_bench.stats import Nemenyi, nemenyi
from gpfm_jax.evaluation.results import write_json_atomic

TYPE_ORDER = ("knn", "linear", "fewshot", "retrieval", "mil", "survival", "report", "slide_vqa", "vqa")


class ReportError(ValueError):
    """The run folder cannot be reported (missing or inconsistent cells); the message says which."""


def load_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, dict]]]:
    """(run.json, {task: {encoder: cell}}); raises ReportError naming every missing cell."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / RUN_FILE)
    if run is None:
        raise ReportError(f"{run_dir}: no {RUN_FILE}; run `gpfm-bench run SUITE --out {run_dir}` first")
    cache = Path(run["cache"])
    cells: dict[str, dict[str, dict]] = {}
    missing = []
    for task, per_enc in run["cells"].items():
        for enc, key in per_enc.items():
            cell = read_json(cache / "cells" / f"{key}.json")
            if cell is None:
                missing.append(f"{enc} x {task}")
            else:
                cells.setdefault(task, {})[enc] = cell
    if missing:
        raise ReportError(f"{run_dir}: {len(missing)} cell(s) not computed yet ({', '.join(missing[:8])}"
                          f"{' ...' if len(missing) > 8 else ''}); rerun `gpfm-bench run` (it resumes)")
    return run, cells


def _aligned(task: str, encoders: list[str], cells: dict[str, dict]) -> tuple[dict, list[np.ndarray]]:
    """The first encoder's rows, and for every encoder the permutation putting its rows in that order. Refuses
    cells whose rows or targets differ (they were not run on the same data)."""
    ref = cells[encoders[0]]["rows"]
    keys = list(zip(ref["group"], ref["id"]))
    perms = []
    for e in encoders:
        rows = cells[e]["rows"]
        where = {k: i for i, k in enumerate(zip(rows["group"], rows["id"]))}
        if set(where) != set(keys):
            raise ReportError(f"task {task}: encoder {e} predicted other rows than {encoders[0]} "
                              f"({len(where)} vs {len(keys)}); were they run on different data?")
        perm = np.array([where[k] for k in keys])
        if cells[e].get("classes") != cells[encoders[0]].get("classes"):
            raise ReportError(f"task {task}: encoder {e}'s classes differ from {encoders[0]}'s")
        for field in ("unit", "y", "time", "event"):
            if field in ref and (field not in rows or np.any(np.asarray(rows[field], dtype=object)[perm]
                                                            != np.asarray(ref[field], dtype=object))):
                raise ReportError(f"task {task}: encoder {e}'s {field} differ from {encoders[0]}'s")
        perms.append(perm)
    return ref, perms


def task_predictions(task: str, info: dict, encoders: list[str], cells: dict[str, dict]) -> list[TaskPredictions]:
    """One TaskPredictions per metric of the task (all share the task's name, hence its resamples)."""
    ref, perms = _aligned(task, encoders, cells)
    _, units = np.unique(np.asarray(ref["unit"]), return_inverse=True)
    _, groups = np.unique(np.asarray(ref["group"]), return_inverse=True)
    out = []
    for metric in info["metrics"]:
        kw: dict[str, Any] = {}
        if info["type"] == "survival":
            scores = np.stack([np.asarray(cells[e]["risk"], np.float64)[p] for e, p in zip(encoders, perms)])
            kw = {"time": np.asarray(ref["time"], np.float64), "event": np.asarray(ref["event"], bool)}
        elif info["type"] in ("retrieval", "report", "slide_vqa", "vqa"):  # per-row values
            scores = np.stack([np.asarray(cells[e]["values"][metric], np.float64)[p] for e, p in zip(encoders, perms)])
        else:
            scores = np.stack([np.asarray(cells[e]["scores"], np.float64)[p] for e, p in zip(encoders, perms)])
            kw = {"y": np.asarray(ref["y"], np.int64), "num_classes": len(cells[encoders[0]]["classes"])}
        out.append(TaskPredictions(task, metric, units, groups, scores, **kw))
    return out


def build_report(run_dir: str | os.PathLike, replicates: int = 1000, seed: int = 0, level: float = 0.95,
                 alpha: float = 0.05) -> dict[str, Any]:
    if replicates < 1:
        raise ReportError(f"--replicates must be >= 1, got {replicates}")
    run, cells = load_run(run_dir)
    encoders = list(run["encoders"])
    tasks = list(run["tasks"])
    preds: list[TaskPredictions] = []
    for t in tasks:
        preds += task_predictions(t, run["tasks"][t], encoders, cells[t])
    start = time.perf_counter()
    boot = bootstrap_metrics(preds, replicates, seed)
    seconds = time.perf_counter() - start
    primary = [i for i, p in enumerate(preds) if p.metric == run["tasks"][p.name]["metrics"][0]]
    ranking = rank_encoders(encoders, boot.observed[primary], boot.replicates[:, primary], level)
    cd = nemenyi(boot.observed[primary], alpha)
    ci = percentile_ci(boot.replicates, level)  # [T', E, 2]
    per_task: dict[str, Any] = {}
    for i, p in enumerate(preds):
        info = run["tasks"][p.name]
        entry = per_task.setdefault(p.name, {"type": info["type"], "dataset": info["dataset"],
                                             "metric": info["metrics"][0], "rows": int(len(p.units)),
                                             "units": p.num_units, "groups": int(p.groups.max()) + 1, "metrics": {}})
        entry["metrics"][p.metric] = {e: {"value": _num(boot.observed[i, j]), "ci95": [_num(v) for v in ci[i, j]]}
                                      for j, e in enumerate(encoders)}
    for k, t in enumerate(tasks):
        per_task[t]["ranks"] = dict(zip(encoders, map(float, ranking.task_ranks[k])))
        if "texts" in cells[t][encoders[0]]:
            per_task[t]["text_metrics"] = {e: _text_metrics(cells[t][e]["texts"]) for e in encoders}
    return {"suite": run["name"], "run": str(Path(run_dir).absolute()), "replicates": replicates, "seed": seed,
            "level": level, "encoders": encoders, "tasks": per_task, "ranking": ranking.to_json(),
            "nemenyi": cd.to_json(encoders),
            "timing": {"bootstrap_seconds": round(seconds, 3), "replicates_per_step": boot.batch},
            "_ranking": ranking, "_nemenyi": cd}


def _text_metrics(texts: dict[str, list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 / ROUGE-L / CIDEr-D recomputed from a text cell's generated and reference texts."""
    from gpfm_jax.text import metrics as text_metrics

    stats = text_metrics.text_stats([h.split() for h in texts["prediction"]], [[r.split()] for r in texts["reference"]])
    return {k: float(v) for k, v in text_metrics.caption_metrics(stats).items()}


def _num(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(rep: dict[str, Any]) -> str:
    ranking: Ranking = rep["_ranking"]
    cd: Nemenyi = rep["_nemenyi"]
    enc = rep["encoders"]
    order = [enc[i] for i in ranking.order()]
    lines = [f"# gpfm-bench report: {rep['suite']}", "",
             f"{len(rep['tasks'])} tasks x {len(enc)} encoders; {rep['replicates']} joint paired bootstrap "
             f"replicates (patients resampled within every task, seed {rep['seed']}); intervals are "
             f"{int(rep['level'] * 100)}% percentile intervals. Rank 1 = best; ties share the average rank.", "",
             "| task | type | metric | " + " | ".join(order) + " |", "|---|---|---|" + "---|" * len(order)]
    tasks = sorted(rep["tasks"].items(), key=lambda kv: (TYPE_ORDER.index(kv[1]["type"]), kv[0]))
    for name, t in tasks:
        m = t["metrics"][t["metric"]]
        best = max((m[e]["value"] for e in order if m[e]["value"] is not None), default=None)
        cells = []
        for e in order:
            v, (lo, hi) = m[e]["value"], m[e]["ci95"]
            s = f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"
            cells.append(f"**{s}**" if v is not None and v == best else s)
        lines.append(f"| {name} | {t['type']} | {t['metric']} | " + " | ".join(cells) + " |")
    r = rep["ranking"]["per_encoder"]
    lines.append("| **average rank** | | | " + " | ".join(
        f"{r[e]['avg_rank']:.2f} [{r[e]['avg_rank_ci95'][0]:.2f}, {r[e]['avg_rank_ci95'][1]:.2f}]" for e in order)
                 + " |")
    lines.append("| **P(first)** | | | " + " | ".join(f"{r[e]['p_first']:.3f}" for e in order) + " |")
    lines.append("| **tasks won** | | | " + " | ".join(
        f"{r[e]['tasks_won']:g} [{r[e]['tasks_won_ci95'][0]:g}, {r[e]['tasks_won_ci95'][1]:g}]" for e in order)
                 + " |")
    text = [(n, t) for n, t in tasks if "text_metrics" in t]
    if text:
        lines += ["", "## Text tasks: corpus metrics recomputed from the generated texts", "",
                  "| task | encoder | BLEU-1 | BLEU-4 | ROUGE-L | CIDEr-D |", "|---|---|---|---|---|---|"]
        for name, t in text:
            for e in order:
                m = t["text_metrics"][e]
                lines.append(f"| {name} | {e} | {m['bleu_1']:.3f} | {m['bleu_4']:.3f} | {m['rouge_l']:.3f} | "
                             f"{m['cider_d']:.3f} |")
    lines += ["", "## Pairwise win probability", "",
              "P(row has a lower average rank than column) over the bootstrap replicates (ties count 1/2).", "",
              "| | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    wp = rep["ranking"]["win_probability"]
    for a in order:
        lines.append(f"| {a} | " + " | ".join("-" if a == b else f"{wp[a][b]:.3f}" for b in order) + " |")
    fried = (f"Friedman chi2 = {cd.friedman_stat:.2f}, p = {cd.friedman_p:.3g}" if cd.friedman_stat is not None
             else "Friedman test: needs >= 3 encoders and >= 2 tasks")
    lines += ["", "## Friedman / Nemenyi", "",
              f"{fried}; Nemenyi critical difference at alpha = {cd.alpha}: {cd.cd:.3f} average-rank units over "
              f"{cd.num_tasks} tasks (these tests take each task's observed ranking as exact; the bootstrap above "
              f"carries each test set's sampling noise).", "",
              "![average rank with 95% CI](ranking.png)", "", "![critical difference diagram](cd_diagram.png)", "",
              "![pairwise win probability](win_probability.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: str | os.PathLike, replicates: int = 1000, seed: int = 0, level: float = 0.95,
                 alpha: float = 0.05, plots: bool = True) -> dict[str, Any]:
    rep = build_report(run_dir, replicates, seed, level, alpha)
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "report.md", markdown(rep))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "type", "metric", "primary", "encoder", "value", "ci_low", "ci_high", "rank"])
    for name, t in rep["tasks"].items():
        for metric, per in t["metrics"].items():
            for e, v in per.items():
                rank = t["ranks"][e] if metric == t["metric"] else ""
                w.writerow([name, t["type"], metric, metric == t["metric"], e, v["value"], *v["ci95"], rank])
    _write_text(out / "metrics.csv", buf.getvalue())
    write_json_atomic(out / "report.json", {k: v for k, v in rep.items() if not k.startswith("_")})
    if plots:
        from gpfm_jax.encoder_bench import plots as plot

        plot.ranking_plot(rep["_ranking"], out / "ranking.png")
        plot.cd_diagram(rep["_nemenyi"], rep["encoders"], out / "cd_diagram.png")
        plot.win_matrix(rep["_ranking"], out / "win_probability.png")
    return rep


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)
