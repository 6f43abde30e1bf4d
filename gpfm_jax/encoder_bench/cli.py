"""gpfm-bench: the benchmark as one command (also `python -m gpfm_jax.encoder_bench`).

    gpfm-bench run SUITE.toml --out DIR [--cache DIR]     extract what is missing, evaluate every encoder x task
    gpfm-bench report DIR [--replicates 1000] [--seed 0]  per-task metrics with CIs, the ranking with its
                                                          uncertainty, Friedman / Nemenyi; markdown, CSV, JSON, PNGs

Exit status 2 on bad input (the suite file and field, the missing cell, ... are named).
"""

from __future__ import annotations

import argparse
import logging
import sys

from gpfm_jax.cli_logging import log_to_stderr


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpfm-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="compute every encoder x task cell that is not cached")
    run.add_argument("suite", help="suite file (TOML; see docs/benchmark.md)")
    run.add_argument("--out", required=True, help="run folder (run.json, log.jsonl, report/)")
    run.add_argument("--cache", default=None, help="feature / cell store, shareable between runs (default OUT/cache)")
    run.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="tables, ranking and plots from a run folder")
    rep.add_argument("run_dir", help="the --out folder of gpfm-bench run")
    rep.add_argument("--replicates", type=int, default=1000, help="joint paired bootstrap replicates")
    rep.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    rep.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    rep.add_argument("--alpha", type=float, default=0.05, help="Nemenyi significance level")
    rep.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr("gpfm-bench: %(message)s", "gpfm_jax.encoder_bench", "gpfm_jax.evaluate", "gpfm_jax.extract",
                  level=logging.WARNING)
    from gpfm_jax.convert.torch_io import CheckpointError

    try:
        if args.command == "run":
            from gpfm_jax.encoder_bench.run import run_suite

            stats = run_suite(args.suite, args.out, args.cache, progress=not args.no_progress)
            print(f"{stats.cells} cells: {stats.evaluated} evaluated, {stats.cached_cells} cached; feature sets: "
                  f"{stats.extracted} extracted, {stats.cached_features} cached; {stats.converted} converted; "
                  f"{stats.seconds:.1f} s -> {args.out}")
        else:
            from gpfm_jax.encoder_bench.report import write_report

            rep = write_report(args.run_dir, args.replicates, args.seed, args.level, args.alpha,
                               plots=not args.no_plots)
            r = rep["_ranking"]
            for e in r.order():
                lo, hi = r.avg_rank_ci[e]
                print(f"{r.encoders[e]:<16} average rank {r.avg_rank[e]:.2f} [{lo:.2f}, {hi:.2f}]  "
                      f"P(first) {r.p_first[e]:.3f}  tasks won {r.tasks_won[e]:g}")
            print(f"{rep['timing']['bootstrap_seconds']:.1f} s bootstrap ({rep['replicates']} replicates) -> "
                  f"{args.run_dir}/report/report.md")
    except (FileNotFoundError, ValueError, OSError, CheckpointError) as e:
        print(f"gpfm-bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
