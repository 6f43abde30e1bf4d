"""gpfm-train: GPFM pretraining from an ml_collections config file.

    gpfm-train [--config configs/demo.py] --workdir DIR [--config.<field>=<value> ...]
    python -m gpfm_jax.train.main --config configs/gpfm_vitl14.py --workdir runs/gpfm --config.data.path=index.json

The default config is configs/demo.py (a few minutes on a laptop CPU). Run the same command again to resume from
the latest checkpoint in DIR/checkpoints. Multi-host: one command per host; jax.distributed is initialised from the
environment (SLURM, TPU pods, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). See docs/training.md.
Exit status: 0 done or pre-empted (checkpoint saved), 1 non-finite loss, 2 bad config, 3 a checkpoint save failed
(disk full, I/O error), 4 a phase passed its deadline (stalled data, step or checkpoint), 5 a peer process was lost,
6 self-distillation collapsed with config.sanity.on_collapse=stop (checkpoint saved).
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.py"

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Training config file (a Python file with get_config()); override fields with "
    "--config.<field>=<value>.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard events, the config. A "
                    "gs:// URL keeps them in a bucket (multi-host runs without a shared disk; docs/storage.md).")
flags.DEFINE_string("scratch", None, "With a gs:// --workdir: the local folder for metrics.jsonl, TensorBoard and "
                    "the slide cache before they are copied to the bucket (default: $GPFM_SCRATCH or the temp folder).")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    from gpfm_jax.train import faults
    from gpfm_jax.train.config_schema import ConfigError, parse
    from gpfm_jax.train.loop import train

    try:
        cfg = parse(FLAGS.config)  # the only parse: train() and everything below take the typed config
        result = train(cfg, FLAGS.workdir, FLAGS.scratch)
    except ConfigError as err:
        faults.report(f"config error: {err}")
        return faults.EXIT_CONFIG
    codes = {"nonfinite": faults.EXIT_NONFINITE, "save_failed": faults.EXIT_SAVE_FAILED,
             "stalled": faults.EXIT_STALLED, "peer_lost": faults.EXIT_PEER_LOST,
             "collapsed": faults.EXIT_COLLAPSED}
    if result.status in ("nonfinite", "collapsed"):
        faults.report(result.message)
    if result.status in ("stalled", "peer_lost"):
        # Threads may still be blocked (a data read, a collective waiting for the dead peer) and the interpreter's
        # exit would wait for them and at jax.distributed's shutdown barrier: leave now, everything is written.
        faults.hard_exit(codes[result.status])
    return codes.get(result.status, 0)


def cli() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    cli()
