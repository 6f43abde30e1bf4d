"""gpfm-eval: weighted kNN and linear probes on features from gpfm-extract (also `python -m gpfm_jax.evaluate`).

    gpfm-eval knn    --train TRAIN.h5 [--test TEST.h5 | --test-fraction 0.3] [--labels CSV] [--k 20] [--temperature 0.07]
    gpfm-eval linear --train TRAIN.h5 [--val VAL.h5 | --val-fraction 0.1] [--test TEST.h5 | --test-fraction 0.3] ...

Labels come from a CSV (path,label) or, by default, from the folder name of each stored tile path. Prints accuracy,
balanced accuracy, macro-F1 and AUC (one-vs-rest macro for more than two classes) with percentile bootstrap
confidence intervals (fixed seed). Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from gpfm_jax.evaluation import data, metrics


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
    return parser


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
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"gpfm-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
