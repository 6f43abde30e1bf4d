"""gpfm-eval: evaluation of features from gpfm-extract (also `python -m gpfm_jax.evaluation`).

    gpfm-eval knn       --train TRAIN.h5 [--test TEST.h5 | --test-fraction 0.3] [--labels CSV] [--k 20]
    gpfm-eval linear    --train TRAIN.h5 [--val VAL.h5] [--test TEST.h5] ...
    gpfm-eval retrieval --features DB.h5 [--query Q.h5 | --query-fraction 0.3] [--labels CSV]
    gpfm-eval mil       --features DIR --labels SLIDES.csv --task classification|survival --model abmil|transmil|mean
                        [--folds K] [--save-attention DIR] --out results.json
    gpfm-eval heatmap   --slide S.svs --attention ATT/S.h5 [--features FEAT/S.h5] --out S.png
    gpfm-eval report    --features DIR --annotations HISTGEN.json --out results.json      (docs/text_tasks.md)
    gpfm-eval vqa       --format wsivqa|pathvqa --features ... --train T --val V --test X --out results.json

Tile-level commands (knn, linear, retrieval) take tile-feature files (`features`, `paths`); labels come from a CSV
(path,label) or from the folder name of each stored path. Slide-level commands (mil, heatmap) take the per-slide
files (`features`, `coords`). Metrics carry percentile bootstrap confidence intervals (fixed seed). Exit status 2
on bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from gpfm_jax.cli_logging import log_to_stderr
from gpfm_jax.evaluation import data, metrics, text_cli
from gpfm_jax.evaluation.results import write_json_atomic
from gpfm_jax.evaluation.mil_models import MODELS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", nargs="+", required=True, help="training feature .h5 file(s)")
    p.add_argument("--test", nargs="+", default=None, help="test feature .h5 file(s); default: split off --train")
    p.add_argument("--test-fraction", type=float, default=0.3, help="stratified test split when --test is absent")
    p.add_argument("--labels", default=None, help="CSV path,label (default: folder names of the stored paths)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, bootstrap and probe shuffling")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpfm-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    knn = sub.add_parser("knn", help="weighted kNN (DINO): cosine similarity, top-k, weights exp(sim / T)")
    _common(knn)
    knn.add_argument("--k", type=int, nargs="+", default=[20], help="one or more k")
    knn.add_argument("--temperature", type=float, default=0.07)
    lin = sub.add_parser("linear", help="linear probe: logistic regression, AdamW + cosine, early stopping")
    _common(lin)
    lin.add_argument("--val", nargs="+", default=None, help="validation .h5 file(s); default: split off --train")
    lin.add_argument("--val-fraction", type=float, default=0.1)
    lin.add_argument("--lr", type=float, default=1e-3)
    lin.add_argument("--weight-decay", type=float, default=1e-4)
    lin.add_argument("--epochs", type=int, default=100)
    lin.add_argument("--batch-size", type=int, default=256)
    lin.add_argument("--patience", type=int, default=10)
    lin.add_argument("--normalise", choices=("standard", "l2", "none"), default="standard")
    _retrieval_parser(sub)
    _mil_parser(sub)
    _heatmap_parser(sub)
    text_cli.add_parsers(sub)
    return parser


def _retrieval_parser(sub) -> None:
    p = sub.add_parser("retrieval", help="ROI retrieval: z-scored features, L2 distance, acc@1/3/5 (majority "
                                         "vote), hit@k, mAP@5")
    p.add_argument("--features", nargs="+", required=True, help="database tile-feature .h5 file(s)")
    p.add_argument("--query", nargs="+", default=None, help="query .h5 file(s); default: the CSV's split column "
                                                            "(database/query) or a stratified --query-fraction")
    p.add_argument("--query-fraction", type=float, default=0.3)
    p.add_argument("--labels", default=None, help="CSV path,label[,split] (default: folder names)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", "--out", dest="json", default=None, help="write the results to this JSON file")


def _mil_parser(sub) -> None:
    p = sub.add_parser("mil", help="slide-level MIL classification or survival, cross-validated")
    p.add_argument("--features", required=True, help="folder of per-slide .h5 files from gpfm-extract")
    p.add_argument("--labels", required=True, help="CSV slide_id,label[,split] or slide_id,time,event[,split]; "
                                                   "an optional case_id/patient column groups slides")
    p.add_argument("--task", choices=("classification", "survival"), default="classification")
    p.add_argument("--model", choices=MODELS, default="abmil")
    p.add_argument("--loss", choices=("auto", "nll_surv", "cox"), default="auto",
                   help="survival loss (auto: nll_surv); classification always uses cross-entropy")
    p.add_argument("--folds", type=int, default=None, help="K patient-grouped folds (default: the CSV's split "
                                                          "column, else 5)")
    p.add_argument("--patient-column", default=None, help="default: case_id, patient_id or patient if present")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=0, help="bags per step (0: 1, or 16 for Cox)")
    p.add_argument("--max-instances", type=int, default=None, help="random tile subset per training bag")
    p.add_argument("--hidden-dim", type=int, default=512, help="fc width (0: no projection)")
    p.add_argument("--attention-dim", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--survival-bins", type=int, default=4)
    p.add_argument("--bucket-factor", type=float, default=1.25, help="padded bag sizes grow by this factor")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-attention", default=None, help="folder for each test slide's attention (.h5)")
    p.add_argument("--out", "--json", dest="json", default=None, help="results JSON (written atomically)")


def _heatmap_parser(sub) -> None:
    p = sub.add_parser("heatmap", help="draw a slide's attention over its thumbnail (PNG)")
    p.add_argument("--slide", required=True, help="the whole-slide image")
    p.add_argument("--attention", required=True, help="attention .h5 written by mil --save-attention")
    p.add_argument("--features", default=None, help="the slide's feature .h5 (coords, tile size)")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--max-size", type=int, default=2048, help="longest side of the thumbnail")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--tile-span", type=int, default=None, help="level-0 tile size if the files lack it")
    p.add_argument("--scale", choices=("percentile", "linear"), default="percentile",
                   help="colour by within-slide percentile (CLAM) or by attention / max")


def _splits(args) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names and {"train"|"val"|"test": (x, y)}."""
    train = data.load_labelled(args.train, args.labels)
    parts = {"train": train}
    if args.test:
        parts["test"] = data.load_labelled(args.test, args.labels)
    if getattr(args, "val", None):
        parts["val"] = data.load_labelled(args.val, args.labels)
    classes, ys = data.encode_labels(*(p.labels for p in parts.values()))
    out = {name: (p.features, y) for (name, p), y in zip(parts.items(), ys)}
    if "test" not in out:
        keep, held = data.stratified_split(out["train"][1], args.test_fraction, args.seed)
        x, y = out["train"]
        out["train"], out["test"] = (x[keep], y[keep]), (x[held], y[held])
    if args.command == "linear" and "val" not in out:
        keep, held = data.stratified_split(out["train"][1], args.val_fraction, args.seed + 1)
        x, y = out["train"]
        out["train"], out["val"] = (x[keep], y[keep]), (x[held], y[held])
    if len(np.unique(out["train"][1])) < 2:
        raise ValueError("the training set has fewer than two classes")
    if len(out["test"][1]) == 0:
        raise ValueError("the test set is empty")
    return classes, out


def _score(y: np.ndarray, proba: np.ndarray, args) -> dict[str, Any]:
    point = metrics.classification_metrics(y, proba)
    ci = metrics.bootstrap(y, proba, args.bootstrap, args.seed) if args.bootstrap > 0 else {}
    return {m: {"value": point[m], "ci95": list(ci[m]) if m in ci else None} for m in metrics.METRICS}


def _print(title: str, result: dict[str, Any]) -> None:
    print(title)
    for m in metrics.METRICS:
        v, ci = result[m]["value"], result[m]["ci95"]
        tail = f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        print(f"  {m:<18} {v:.4f}{tail}")


def run(args) -> dict[str, Any]:
    if args.command == "mil":
        return _run_mil(args)
    if args.command == "heatmap":
        return _run_heatmap(args)
    if args.command == "retrieval":
        return _run_retrieval(args)
    if args.command in ("report", "vqa"):
        return text_cli.run(args)
    classes, sets = _splits(args)
    (xt, yt), (xs, ys) = sets["train"], sets["test"]
    sizes = {k: int(len(v[1])) for k, v in sets.items()}
    header = f"{', '.join(f'{v} {k}' for k, v in sizes.items())}; {len(classes)} classes"
    results: dict[str, Any] = {"command": args.command, "classes": classes, "sizes": sizes}
    if args.command == "knn":
        from gpfm_jax.evaluation.knn import knn_scores

        for k in args.k:
            proba = knn_scores(xt, yt, xs, len(classes), k, args.temperature)
            results[f"k={k}"] = _score(ys, proba, args)
            _print(f"knn k={k} T={args.temperature} ({header})", results[f"k={k}"])
    else:
        from gpfm_jax.evaluation.linear import LinearProbeConfig, train_linear_probe

        cfg = LinearProbeConfig(learning_rate=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
                                batch_size=args.batch_size, patience=args.patience, normalise=args.normalise,
                                seed=args.seed)
        probe = train_linear_probe(xt, yt, *sets["val"], len(classes), cfg)
        results["linear"] = _score(ys, probe.predict_proba(xs), args)
        results["best_epoch"], results["epochs_run"] = probe.best_epoch, len(probe.history)
        _print(f"linear probe, best epoch {probe.best_epoch + 1} of {len(probe.history)} ({header})",
               results["linear"])
    if args.json:
        write_json_atomic(args.json, results)
    return results


def _run_retrieval(args) -> dict[str, Any]:
    from gpfm_jax.evaluation.retrieval import read_split_column, retrieval

    db = data.load_labelled(args.features, args.labels)
    split = read_split_column(args.labels) if args.labels and not args.query else None
    if args.query:
        q = data.load_labelled(args.query, args.labels)
        classes, (yd, yq) = data.encode_labels(db.labels, q.labels)
        xd, xq = db.features, q.features
    else:
        classes, (y,) = data.encode_labels(db.labels)
        if split:
            role = np.array([data._lookup(split, p) for p in db.paths], dtype=object)
            if bad := sorted({str(r) for r in role} - {"database", "query", "train", "test", "None"}):
                raise ValueError(f"{args.labels}: split values must be database/query (or train/test), got {bad}")
            qmask = np.isin(role, ["query", "test"])
            keep, held = np.flatnonzero(~qmask & (role != None)), np.flatnonzero(qmask)  # noqa: E711
        else:
            keep, held = data.stratified_split(y, args.query_fraction, args.seed)
        xd, yd, xq, yq = db.features[keep], y[keep], db.features[held], y[held]
    if len(xq) == 0 or len(xd) == 0:
        raise ValueError(f"retrieval needs queries and a database; got {len(xq)} queries, {len(xd)} database ROIs")
    res = retrieval(xd, yd, xq, yq, len(classes), bootstrap=args.bootstrap, seed=args.seed)
    results = {"command": "retrieval", "classes": classes, "sizes": {"database": len(xd), "query": len(xq)}, **res}
    print(f"retrieval ({len(xq)} queries, {len(xd)} database ROIs, {len(classes)} classes)")
    for m, v in res.items():
        tail = f"  [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" if v["ci95"] else ""
        print(f"  {m:<8} {v['value']:.4f}{tail}")
    if args.json:
        write_json_atomic(args.json, results)
    return results


def _run_mil(args) -> dict[str, Any]:
    from gpfm_jax.evaluation.mil_cv import MILRun, run_mil
    from gpfm_jax.evaluation.mil_models import MILConfig
    from gpfm_jax.evaluation.mil_train import TrainConfig

    loss = "ce" if args.task == "classification" else ("nll_surv" if args.loss == "auto" else args.loss)
    model = MILConfig(model=args.model, hidden_dim=args.hidden_dim or None, attention_dim=args.attention_dim,
                      dropout=args.dropout)
    train = TrainConfig(loss=loss, learning_rate=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
                        patience=args.patience, batch_size=args.batch_size, max_instances=args.max_instances,
                        bucket_factor=args.bucket_factor)
    run_cfg = MILRun(args.features, args.labels, args.task, model, train, args.folds, args.patient_column,
                     args.survival_bins, args.bootstrap, args.seed, args.save_attention)
    return run_mil(run_cfg, args.json)


def _run_heatmap(args) -> dict[str, Any]:
    from gpfm_jax.evaluation.heatmap import slide_heatmap

    out = slide_heatmap(args.slide, args.attention, args.out, args.features, args.max_size, args.alpha,
                        args.tile_span, args.scale)
    print(f"heatmap -> {out}")
    return {"command": "heatmap", "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr("gpfm-eval: warning: %(message)s", "gpfm_jax.evaluate")  # warnings naming slides / folds
    try:
        run(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"gpfm-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
