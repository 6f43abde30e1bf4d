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


def _define_flags() -> None:
    """Defined when the command runs, not at import: config_flags loads the config file and applies the overrides
    of sys.argv as the flag is defined, and an error there must become cli()'s one line."""
    if "config" in FLAGS:
        return
    app.define_help_flags()  # --help / --helpfull print the flags and exit, as under app.run
    config_flags.DEFINE_config_file(
        "config", str(_DEFAULT_CONFIG), "Training config file (a Python file with get_config()); override fields "
        "with --config.<field>=<value>.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard events, the config. A "
                        "gs:// URL keeps them in a bucket (multi-host runs without a shared disk; docs/storage.md).")
    flags.DEFINE_string("scratch", None, "With a gs:// --workdir: the local folder for metrics.jsonl, TensorBoard "
                        "and the slide cache before they are copied to the bucket (default: $GPFM_SCRATCH or the "
                        "temp folder).")


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


def _config_file(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return str(_DEFAULT_CONFIG)


def _unknown_override(argv: list[str]) -> str | None:
    """'config.optim.lrr: no such field; nearest: config.optim.lr' for the first --config.<path>=... override whose
    path the config file does not have ('' if all exist, None if the file cannot be loaded)."""
    import difflib
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location("gpfm_config_probe", _config_file(argv))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception:  # noqa: BLE001 - the flag parser's own message is used then
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, walked = config, "config"
        for key in arg[2:].split("=", 1)[0].split(".")[1:]:
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
                hint = f"; nearest: {', '.join(f'{walked}.{k}' for k in near)}" if near else \
                    f"; fields here: {', '.join(sorted(keys))}" if keys else f" ({walked} is a value, not a section)"
                return f"{walked}.{key}: no such field{hint}"
            node, walked = node[key], f"{walked}.{key}"
    return ""


def explain_flag_error(err: BaseException, argv: list[str]) -> str:
    """One line for a command line the flag parser refused: a missing config file, an unknown field (with the
    nearest names), a value of the wrong type."""
    path = _config_file(argv)
    if not Path(path).is_file():
        return f"config file {path}: no such file"
    unknown = _unknown_override(argv)
    if unknown:
        return unknown
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def cli() -> None:
    """Console-script entry point. A command line the flag parser refuses (an unknown --config field, a bad value,
    a missing config file) is one line and exit status 2, not absl's traceback."""
    import sys

    from gpfm_jax.train import faults

    try:
        _define_flags()
        parsed = FLAGS(sys.argv)
        FLAGS.config.to_dict()  # the file is loaded lazily: load it here, where its errors become one line
    except Exception as err:  # noqa: BLE001 - config_flags raises KeyError / AttributeError / OSError / flags.Error
        faults.report(f"config error: {explain_flag_error(err, sys.argv)}")
        sys.exit(faults.EXIT_CONFIG)
    app.run(main, flags_parser=lambda _argv: parsed)


if __name__ == "__main__":
    cli()
