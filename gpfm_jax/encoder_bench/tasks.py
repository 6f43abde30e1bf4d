"""One cell: one encoder's features through one task, by gpfm_jax.evaluation's code, down to per-row predictions.

A cell keeps what the report needs to recompute every metric exactly without retraining: per prediction row its
item id, resampling unit (patient), group (fold, or fold x episode) and target, and the encoder's scores for it
(class scores, a survival risk, or retrieval's per-query values). Splits depend only on labels, patients and the
suite seed, never on the features, so every encoder of a task predicts the same rows.

Tile tasks split by patient: the dataset's split column, else `folds` (default 5) patient-grouped folds stratified by
class (`bags.grouped_folds`, as gpfm-eval mil deals them); in fold i the test set is fold i and the rest trains.
- knn: DINO's weighted kNN (`evaluation.knn`), train -> test;
- linear: the AdamW logistic probe (`evaluation.linear`), validation = the split's `val` rows, else a patient-grouped
  `val_fraction` of the training rows (early stopping);
- fewshot: SimpleShot (`evaluation.fewshot`), `episodes` supports of `shots` tiles per class drawn from the training
  rows, each predicting every test row (one group per fold x episode);
- retrieval: the training rows are the database, the test rows the queries (`evaluation.retrieval`).
Slide tasks run `evaluation.mil_cv.run_mil` (its folds, early stopping and models) and keep its predictions.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_jax.encoder_bench.datasets import SlideSet, TileSet
from gpfm_jax.encoder_bench.suite import TaskSpec
from gpfm_jax.evaluation import bags, data

log = logging.getLogger("gpfm_jax.encoder_bench")


def tile_splits(task: TaskSpec, y: np.ndarray, units: list[str], splits: list[str] | None,
                seed: int) -> list[dict[str, np.ndarray]]:
    """[{train, val, test}] per fold (val may be empty: the linear probe then carves its own)."""
    if task.folds is None and splits is not None:
        s = np.array(splits)
        out = {"train": np.flatnonzero((s == "train") | (s == "val")), "val": np.flatnonzero(s == "val"),
               "test": np.flatnonzero(s == "test")}
        if len(out["test"]) == 0 or len(out["train"]) == 0:
            raise ValueError(f"tasks.{task.name}: the split column has no train or no test rows")
        return [out]
    k = task.folds or 5
    try:
        fold = bags.grouped_folds(y, units, k, seed)
    except bags.BagError as e:
        raise ValueError(f"tasks.{task.name}: {e}") from None
    return [{"train": np.flatnonzero(fold != i), "val": np.zeros(0, np.int64), "test": np.flatnonzero(fold == i)}
            for i in range(k)]


def _validation(train: np.ndarray, y: np.ndarray, units: np.ndarray, fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) with about `fraction` of the training patients held out, stratified by class."""
    k = max(2, int(round(1.0 / fraction)))
    if len(set(units[train].tolist())) >= k:
        fold = bags.grouped_folds(y[train], units[train].tolist(), k, seed)
        return train[fold != 0], train[fold == 0]
    keep, held = data.stratified_split(y[train], fraction, seed)
    return train[keep], train[held]


def _aligned(features: Path, tiles: TileSet) -> tuple[np.ndarray, np.ndarray]:
    """(features in the dataset's row order, kept row indices): tiles the extraction could not read drop out."""
    x, paths = data.read_features([features])
    where = {p: i for i, p in enumerate(paths)}
    keep = np.array([i for i, t in enumerate(tiles.ids) if t in where], np.int64)
    if len(keep) < len(tiles.ids):
        log.warning("%s: %d of %d tiles have no features and are left out", features, len(tiles.ids) - len(keep),
                    len(tiles.ids))
    return x[[where[tiles.ids[i]] for i in keep]], keep


def run_tile_task(task: TaskSpec, seed: int, features: Path, tiles: TileSet) -> dict[str, Any]:
    x, keep = _aligned(features, tiles)
    classes, (y,) = data.encode_labels([tiles.labels[i] for i in keep])
    units = np.array([tiles.patients[i] for i in keep])
    ids = [tiles.ids[i] for i in keep]
    splits = [tiles.splits[i] for i in keep] if tiles.splits is not None else None
    p, c = task.params, len(classes)
    rows: dict[str, list] = {"id": [], "unit": [], "group": [], "y": []}
    scores: list[np.ndarray] = []
    values: dict[str, list] = {}
    extra: dict[str, Any] = {}

    def emit(idx: np.ndarray, group: int, out) -> None:
        rows["id"] += [ids[i] for i in idx]
        rows["unit"] += units[idx].tolist()
        rows["group"] += [group] * len(idx)
        rows["y"] += y[idx].tolist()
        if isinstance(out, dict):
            for k, v in out.items():
                values.setdefault(k, []).extend(np.asarray(v, np.float64).tolist())
        else:
            scores.append(np.asarray(out, np.float64))

    for f, split in enumerate(tile_splits(task, y, units.tolist(), splits, seed)):
        tr, te = split["train"], split["test"]
        if task.type == "knn":
            from gpfm_jax.evaluation.knn import knn_scores

            emit(te, f, knn_scores(x[tr], y[tr], x[te], c, p["k"], p["temperature"]))
        elif task.type == "linear":
            from gpfm_jax.evaluation.linear import LinearProbeConfig, train_linear_probe

            tr2, va = (tr[~np.isin(tr, split["val"])], split["val"]) if len(split["val"]) else _validation(
                tr, y, units, p["val_fraction"], seed + 1)
            cfg = LinearProbeConfig(learning_rate=p["lr"], weight_decay=p["weight_decay"], epochs=p["epochs"],
                                    batch_size=p["batch_size"], patience=p["patience"], normalise=p["normalise"],
                                    seed=seed)
            probe = train_linear_probe(x[tr2], y[tr2], x[va], y[va], c, cfg)
            extra.setdefault("best_epoch", []).append(probe.best_epoch)
            emit(te, f, probe.predict_proba(x[te]))
        elif task.type == "fewshot":
            from gpfm_jax.evaluation.fewshot import sample_support, simpleshot_scores

            for e in range(p["episodes"]):
                support = tr[sample_support(y[tr], p["shots"], np.random.default_rng([seed, f, e]), c)]
                emit(te, f * p["episodes"] + e, simpleshot_scores(x[support], y[support], x[te], c))
        else:  # retrieval
            from gpfm_jax.evaluation import retrieval

            db, q = retrieval.zscore(x[tr], x[te])
            idx = retrieval.nearest(db, q, 5)
            emit(te, f, retrieval.per_query(y[tr][idx], y[te], c))
    out = {"classes": classes, "rows": rows, "extra": extra}
    if values:
        out["values"] = values
    else:
        out["scores"] = np.concatenate(scores).tolist()
    return out


def _patients(slides: SlideSet) -> dict[str, str]:
    with open(slides.labels_csv, newline="") as f:
        rows = list(csv.DictReader(row for row in f if row.strip() and not row.startswith("#")))
    col = slides.patient
    return {r["slide_id"].strip(): (r[col].strip() if col else r["slide_id"].strip()) for r in rows}


def run_slide_task(task: TaskSpec, seed: int, view: Path, slides: SlideSet) -> dict[str, Any]:
    from gpfm_jax.evaluation.mil_cv import MILRun, run_mil
    from gpfm_jax.evaluation.mil_layers import MILConfig
    from gpfm_jax.evaluation.mil_train import TrainConfig

    p = task.params
    survival = task.type == "survival"
    model = MILConfig(model=p["model"], hidden_dim=p["hidden_dim"] or None, attention_dim=p["attention_dim"],
                      dropout=p["dropout"])
    train = TrainConfig(loss=p["loss"] if survival else "ce", learning_rate=p["lr"], weight_decay=p["weight_decay"],
                        epochs=p["epochs"], patience=p["patience"], batch_size=p.get("batch_size", 0),
                        max_instances=p["max_instances"] or None, bucket_factor=p["bucket_factor"])
    run = MILRun(str(view), str(slides.labels_csv), "survival" if survival else "classification", model, train,
                 task.folds, slides.patient, p.get("bins", 4), bootstrap=0, seed=seed)
    res = run_mil(run, None, echo=lambda *a: log.info(*a))
    patient = _patients(slides)
    preds = res["predictions"]
    rows = {"id": [r["slide_id"] for r in preds], "unit": [patient[r["slide_id"]] for r in preds],
            "group": [int(r["fold"]) for r in preds]}
    extra = {"summary": res["summary"], "num_compiles": res["num_compiles"],
             "best_epochs": [fo["best_epoch"] for fo in res["folds"]],
             "missing_features": res["missing_features"]}
    if survival:
        rows.update(time=[r["time"] for r in preds], event=[bool(r["event"]) for r in preds])
        return {"rows": rows, "risk": [r["risk"] for r in preds], "extra": {**extra, "loss": res["loss"]}}
    classes = res["classes"]
    rows["y"] = [classes.index(r["label"]) for r in preds]
    return {"classes": classes, "rows": rows, "scores": [r["proba"] for r in preds], "extra": extra}


def run_text_task(task: TaskSpec, seed: int, view: Path, items: SlideSet | TileSet,
                  params: dict[str, Any]) -> dict[str, Any]:
    """A report / slide_vqa cell on a synthetic `reports` dataset, or a (tile) vqa cell on a synthetic `tiles`
    dataset (`params`): gpfm-eval's report / vqa runners (their validation-only epoch selection), keeping per test
    sample the generated (or chosen) and reference text and the per-row values the report ranks on (sentence
    ROUGE-L; answer correctness)."""
    import tempfile

    from gpfm_jax.encoder_bench import synthetic
    from gpfm_jax.evaluation.report_task import ReportRun, run_report
    from gpfm_jax.evaluation.vqa_task import VQARun, run_vqa
    from gpfm_jax.text import metrics as text_metrics
    from gpfm_jax.text.models import TextModelConfig
    from gpfm_jax.text.train import TrainConfig

    p = task.params
    model = TextModelConfig(width=p["width"], heads=p["heads"], layers=p["layers"], encoder_layers=p["encoder_layers"],
                            dropout=p["dropout"], region_size=p.get("region_size", 0),
                            memory_slots=p.get("memory_slots", 0))
    train = TrainConfig(learning_rate=p["lr"], lr_decay=p["lr_decay"], weight_decay=p["weight_decay"],
                        clip_value=p["clip_value"], epochs=p["epochs"], batch_size=p["batch_size"], beam=p["beam"],
                        seed=seed)
    if task.type == "vqa":
        patient = {t.rsplit("/", 1)[-1]: pt for t, pt in zip(items.ids, items.patients)}
    else:
        patient = _patients(items)
    with tempfile.TemporaryDirectory() as tmp:
        ann = (synthetic.tile_questions if task.type == "vqa" else synthetic.text_annotations)(params, tmp)
        if task.type == "vqa":
            res = run_vqa(VQARun("pathvqa", [str(view)], ann["train"], ann["val"], ann["test"], ann["answer_list"],
                                 model, train, min_count=p["min_count"], max_length=p["max_length"],
                                 max_question=p["max_question"], bootstrap=0))
        elif task.type == "report":
            res = run_report(ReportRun(str(view), ann["annotations"], model, train, min_count=p["min_count"],
                                       max_length=p["max_length"], bootstrap=0, smallest_bucket=64,
                                       with_meteor=False))
        else:
            res = run_vqa(VQARun("wsivqa", [str(view)], ann["train"], ann["val"], ann["test"], None, model, train,
                                 min_count=p["min_count"], max_length=p["max_length"],
                                 max_question=p["max_question"], bootstrap=0, smallest_bucket=64))
    preds = res["predictions"]
    if task.type == "vqa":
        for pr in preds:
            pr["reference"] = pr["answer"]
        owner = [pr["image"] for pr in preds]
    else:
        owner = [pr["id"].split(":")[0] for pr in preds]
    values = {"rouge_l": [text_metrics.rouge_l_sentence(pr["prediction"].split(), [pr["reference"].split()])
                          for pr in preds]}
    if task.type != "report":
        values["answer_accuracy"] = [float(pr["correct"] or 0.0) for pr in preds]
    rows = {"id": [str(pr["id"]) for pr in preds], "unit": [patient[s] for s in owner], "group": [0] * len(preds)}
    return {"rows": rows, "values": values,
            "texts": {"prediction": [pr["prediction"] for pr in preds], "reference": [pr["reference"] for pr in preds]},
            "extra": {"metrics": res["metrics"], "selected_epoch": res["selected_epoch"],
                      "history": res["history"], "compiles": res["compiles"]}}
