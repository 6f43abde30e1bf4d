"""`gpfm-eval mil`: cross-validated slide-level classification or survival on gpfm-extract's slide files.

Per fold: train on the training slides (early stopping on the validation fold), predict the test fold, score it
(classification: AUC, balanced accuracy, macro-F1, accuracy with bootstrap CIs; survival: Harrell's c-index with a
bootstrap CI), and optionally write each test slide's attention next to its coords. The summary is mean +- std over
folds; a fold whose metric is undefined (one class or no event in its test set) is reported, named, and left out
of the mean. results.json is written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gpfm_jax.evaluation import bags, metrics, mil_train, survival
from gpfm_jax.evaluation.mil_models import MILConfig
from gpfm_jax.evaluation.mil_train import Targets, TrainConfig, train_mil
from gpfm_jax.evaluation.results import write_json_atomic

log = logging.getLogger("gpfm_jax.evaluate")


@dataclasses.dataclass
class MILRun:
    features: str
    labels: str
    task: str = "classification"
    model: MILConfig = dataclasses.field(default_factory=MILConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    folds: int | None = None  # None: the CSV's split column, else 5
    patient_column: str | None = None
    survival_bins: int = 4
    bootstrap: int = 1000
    seed: int = 0
    save_attention: str | None = None  # folder for <slide_id>.h5 (attention, coords)
    cache_gb: float = 8.0


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _summary(values: list[float]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], np.float64)
    return {"mean": _nan_to_none(v.mean()) if v.size else None, "std": _nan_to_none(v.std()) if v.size else None,
            "folds_used": int(v.size), "folds": [_nan_to_none(x) for x in values]}


def _score_classification(logits: np.ndarray, y: np.ndarray, cfg: MILRun, fold: int) -> dict[str, Any]:
    proba = np.exp(logits - logits.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    point = metrics.classification_metrics(y, proba)
    if len(np.unique(y)) < 2:
        log.warning("fold %d: the test set has one class only; its AUC is undefined and left out", fold)
    ci = metrics.bootstrap(y, proba, cfg.bootstrap, cfg.seed) if cfg.bootstrap > 0 else {}
    return {m: {"value": _nan_to_none(point[m]), "ci95": [_nan_to_none(c) for c in ci[m]] if m in ci else None}
            for m in metrics.METRICS}, proba


def _score_survival(risk: np.ndarray, t: np.ndarray, e: np.ndarray, cfg: MILRun, fold: int) -> dict[str, Any]:
    if not e.any():
        log.warning("fold %d: no event in the test set; its c-index is undefined and left out", fold)
        return {"c_index": {"value": None, "ci95": None}}
    c = survival.concordance_index(t, risk, e)
    ci = (metrics.bootstrap_metric(lambda a, b, d: survival.concordance_index(a, b, d), (t, risk, e),
                                   cfg.bootstrap, cfg.seed) if cfg.bootstrap > 0 else None)
    return {"c_index": {"value": _nan_to_none(c), "ci95": [_nan_to_none(x) for x in ci] if ci else None}}


def _targets(table: bags.SlideTable, cfg: MILRun, loss: str) -> tuple[Targets, np.ndarray, dict[str, Any]]:
    if cfg.task == "classification":
        return Targets(label=table.labels), table.labels, {"classes": table.classes}
    info: dict[str, Any] = {}
    tgt = Targets(time=table.time, event=table.event.astype(np.int32))
    if loss == "nll_surv":
        edges = survival.bin_edges(table.time, table.event, table.patients, cfg.survival_bins)
        tgt.bins = survival.discretise(table.time, edges)
        info["bin_edges"] = edges.tolist()
    return tgt, table.event.astype(np.int64), info


def _check_fold(cfg: MILRun, table: bags.SlideTable, fold: int, split: dict[str, np.ndarray]) -> None:
    for name in ("train", "val", "test"):
        if len(split[name]) == 0:
            raise bags.BagError(f"fold {fold}: empty {name} set; use fewer folds")
    tr = split["train"]
    if cfg.task == "classification" and len(np.unique(table.labels[tr])) < 2:
        raise bags.BagError(f"fold {fold}: the training set has one class only "
                            f"({table.classes[int(table.labels[tr][0])]!r})")
    if cfg.task == "survival":
        if not table.event[tr].any():
            raise bags.BagError(f"fold {fold}: no event in the training set; the survival loss is undefined")
        if not table.event[split["val"]].any() and cfg.train.loss == "cox":
            log.warning("fold %d: no event in the validation set; the Cox validation loss is 0 and early stopping "
                        "keeps the first epoch", fold)


def run_mil(cfg: MILRun, out: str | os.PathLike | None = None, echo=print) -> dict[str, Any]:
    table = bags.load_table(cfg.features, cfg.labels, cfg.task, cfg.patient_column)
    store = bags.BagStore(table.files, cfg.cache_gb * 1e9)
    dim, sizes = store.check_all()
    sizes = np.array(sizes)
    buckets = bags.bucket_sizes(int(sizes.max()), cfg.train.bucket_min, cfg.train.bucket_factor)
    loss = cfg.train.loss
    if cfg.task == "survival" and loss == "ce":
        loss = "nll_surv"
    train_cfg = dataclasses.replace(cfg.train, loss=loss, seed=cfg.seed)
    outputs = (len(table.classes) if cfg.task == "classification" else 1 if loss == "cox" else cfg.survival_bins)
    model_cfg = dataclasses.replace(cfg.model, num_outputs=outputs)
    tgt, strata, info = _targets(table, cfg, loss)
    splits = bags.fold_splits(table, strata, cfg.folds, cfg.seed)
    echo(f"{len(table)} slides ({len(set(table.patients))} patients), {dim}-d features, tiles per slide "
         f"{sizes.min()}-{sizes.max()} (median {int(np.median(sizes))}); {len(splits)} fold(s); {cfg.model.model}, "
         f"{loss} loss; buckets {buckets[0]}..{buckets[-1]} ({len(buckets)})")
    results: dict[str, Any] = {
        "command": "mil", "task": cfg.task, "loss": loss, "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg), "features": str(cfg.features), "labels": str(cfg.labels),
        "num_slides": len(table), "feature_dim": dim, "buckets": buckets, **info,
        "missing_features": table.missing_features, "unlabelled_feature_files": table.unlabelled_files,
        "folds": [], "predictions": []}
    shared = mil_train.shared_compiles(model_cfg, train_cfg)  # jitted steps are shared across folds and runs
    before = Counter(shared)
    for k, split in enumerate(splits):
        _check_fold(cfg, table, k, split)
        trained = train_mil(store, sizes, tgt, split["train"], split["val"], model_cfg, train_cfg, dim, buckets)
        test = split["test"]
        logits, atts = trained.model.predict(store, test, buckets, attention=bool(cfg.save_attention))
        if cfg.task == "classification":
            scores, proba = _score_classification(logits, table.labels[test], cfg, k)
            preds = [{"slide_id": table.slide_ids[i], "fold": k, "label": table.classes[table.labels[i]],
                      "proba": p.tolist()} for i, p in zip(test, proba)]
        else:
            risk = (logits[:, 0] if loss == "cox" else
                    np.asarray(survival.nll_surv_risk(np.asarray(logits, np.float32)), np.float64))
            scores = _score_survival(risk, table.time[test], table.event[test], cfg, k)
            preds = [{"slide_id": table.slide_ids[i], "fold": k, "time": float(table.time[i]),
                      "event": bool(table.event[i]), "risk": float(r)} for i, r in zip(test, risk)]
        results["predictions"] += preds
        results["folds"].append({"fold": k, "sizes": {n: int(len(v)) for n, v in split.items()},
                                 "best_epoch": trained.best_epoch, "epochs_run": len(trained.history),
                                 "seconds": round(trained.seconds, 2), **scores})
        line = ", ".join(f"{m} {v['value']:.4f}" if v["value"] is not None else f"{m} n/a" for m, v in scores.items())
        echo(f"fold {k}: {line} (best epoch {trained.best_epoch + 1} of {len(trained.history)}, "
             f"{trained.seconds:.1f} s)")
        if cfg.save_attention:
            _save_attention(cfg, table, test, atts, k)
    names = list(results["folds"][0].keys() - {"fold", "sizes", "best_epoch", "epochs_run", "seconds"})
    results["summary"] = {m: _summary([f[m]["value"] for f in results["folds"]]) for m in sorted(names)}
    compiles = shared - before
    results["compiles"] = dict(compiles)
    results["num_compiles"] = int(sum(compiles.values()))
    for m, s in results["summary"].items():
        if s["mean"] is not None:
            echo(f"{m}: {s['mean']:.4f} +- {s['std']:.4f} over {s['folds_used']} fold(s)")
    echo(f"compiles: {results['num_compiles']} ({len(buckets)} bucket sizes available)")
    if out:
        write_json_atomic(out, results)
    return results


def _save_attention(cfg: MILRun, table: bags.SlideTable, test: np.ndarray, atts: list[np.ndarray], fold: int) -> None:
    """<dir>/<slide_id>.h5: `attention` f32 [N] (softmax weights over the slide's tiles) and `coords` [N, 2],
    written under a temporary name and renamed."""
    from gpfm_jax.extract.h5out import AtomicH5

    root = Path(cfg.save_attention)
    for i, att in zip(test, atts):
        _, coords = bags.read_bag(table.files[i], with_coords=True)
        with h5py.File(table.files[i], "r") as f:
            span = f["coords"].attrs.get("patch_size")
        attrs = {"slide_id": table.slide_ids[i], "fold": fold, "model": cfg.model.model,
                 "features": str(table.files[i]), "patch_size": span}
        with AtomicH5(root / f"{table.slide_ids[i]}.h5", attrs) as h5:
            h5.create("attention", (), np.float32, chunk_rows=max(1, min(len(att), 4096)))
            h5.append("attention", att)
            h5.create("coords", (2,), coords.dtype, chunk_rows=max(1, min(len(att), 4096)))
            h5.append("coords", coords)
