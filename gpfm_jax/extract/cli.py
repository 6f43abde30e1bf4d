"""gpfm-extract command line (also `python -m gpfm_jax.extract`).

Exit status: 0 all done (or already done), 1 some slides failed (the others are written) or a tile set's parts are
still missing, 2 nothing could start
(bad encoder path, empty or missing input, bad options), 3 an output write failed (e.g. a full disk: files finished
before are intact, no partial file is left).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gpfm_jax.cli_logging import log_to_stderr
from gpfm_jax.extract.encoder import DTYPES
from gpfm_jax.extract.inputs import INPUT_KINDS

log = logging.getLogger("gpfm_jax.extract")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpfm-extract",
        description="Extract one feature vector per tile with an encoder bundle (or a training checkpoint's EMA "
                    "teacher): a tile folder / JSON index -> one .h5 (features, paths); slides -> one .h5 per "
                    "slide (features, coords; CLAM layout).")
    p.add_argument("--encoder", required=True, help="encoder bundle folder or gpfm-train checkpoint folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (training checkpoints; default latest)")
    p.add_argument("--input", required=True,
                   help="tile folder, JSON index {slide_dir: [files]}, slide file, folder of slides, or .txt list")
    p.add_argument("--input-kind", choices=INPUT_KINDS, default="auto",
                   help="force tiles/slides (a folder of .tif files is taken for tiles unless 'slides')")
    p.add_argument("--out", required=True, help="FILE.h5 (tiles, or a single slide) or a folder (slides)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (features are saved as float32)")
    p.add_argument("--output", default=None, help="model output used as the feature (default: the bundle's, 'cls')")
    p.add_argument("--tile-size", type=int, default=256, help="slide tile size in pixels at --magnification")
    p.add_argument("--magnification", type=float, default=20.0)
    p.add_argument("--stride", type=int, default=None, help="tile stride at --magnification (default: tile size)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a kept tile")
    p.add_argument("--default-magnification", type=float, default=None,
                   help="objective power to assume for slides whose metadata has neither power nor mpp")
    p.add_argument("--cache-dir", default=None, help="cache tissue grids here")
    p.add_argument("--workers", type=int, default=None,
                   help="tile reader threads (default: 6 per device, at most one per core)")
    p.add_argument("--prefetch", type=int, default=2, help="batches prepared ahead of the encoder")
    p.add_argument("--devices", type=int, default=None,
                   help="use the first N local devices (default: all; the batch is split across them)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (a TPU pod, SLURM, ...: every host runs the same command) "
                        "and take this process's share of the input")
    p.add_argument("--coordinator", default=None,
                   help="with --distributed where the cluster is not detected: HOST:PORT of process 0 (then also "
                        "--process-index / --process-count)")
    p.add_argument("--process-index", type=int, default=None, help="this process's share (0..count-1); without "
                   "--distributed: start the same command with 0..N-1, no coordination needed")
    p.add_argument("--process-count", type=int, default=None, help="number of processes sharing the input")
    p.add_argument("--slide-cache-gb", type=float, default=8.0,
                   help="slides named by URL: at most this many GB downloaded and not yet tiled")
    p.add_argument("--download-dir", default=None,
                   help="local folder for downloaded slides and outputs staged for upload (default: system temp)")
    p.add_argument("--overwrite", action="store_true", help="redo a tile-input output file that already exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr("%(message)s", log.name)
    from gpfm_jax.convert.torch_io import CheckpointError
    from gpfm_jax.extract import runner
    from gpfm_jax.extract.encoder import load_feature_encoder
    from gpfm_jax.extract.h5out import OutputWriteError
    from gpfm_jax.extract.inputs import SlideInput, resolve_input

    from gpfm_jax import storage
    from gpfm_jax.extract.share import current_share

    loader = runner.LoaderOptions(workers=args.workers, depth=args.prefetch, progress=not args.no_progress,
                                  cache_dir=args.download_dir, cache_bytes=int(args.slide_cache_gb * 1e9))
    try:
        if args.distributed:
            import jax

            try:
                jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.process_count,
                                           process_id=args.process_index)
            except (RuntimeError, ValueError) as e:  # no cluster detected, coordinator unreachable
                raise ValueError(f"--distributed: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}; "
                                 "outside a detected cluster give --coordinator, --process-index, "
                                 "--process-count") from None
            share = current_share()
        else:
            share = current_share(args.process_index, args.process_count)
        storage.check_reachable(args.out)
        spec = resolve_input(args.input, args.input_kind)  # cheap checks before loading the encoder
        if isinstance(spec, SlideInput):
            runner.slide_outputs(spec.slides, args.out)
        encoder = load_feature_encoder(args.encoder, batch_size=args.batch_size, dtype=args.dtype,
                                       output=args.output, step=args.step, devices=args.devices)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError, storage.StorageError) as e:
        print(f"gpfm-extract: error: {e}", file=sys.stderr)
        return 2
    log.info("encoder %s: %s, %d-d, input %d px, batch %d on %d device(s), %s, %d reader threads%s", encoder.name,
             encoder.output, encoder.feature_dim, encoder.input_size, encoder.batch_size, encoder.num_devices,
             encoder.dtype, loader.threads(encoder),
             "" if share.alone else f"; process {share.index} of {share.count}")

    if not isinstance(spec, SlideInput):
        out = args.out
        if not str(out).lower().endswith(".h5"):
            out = f"{str(out).rstrip('/')}/{Path(spec.origin).stem or 'tiles'}.h5"
        try:
            result = runner.extract_tiles(encoder, spec, out, loader, overwrite=args.overwrite, share=share)
        except OutputWriteError as e:  # a full disk: nothing half-written is left
            print(f"gpfm-extract: error: {e}", file=sys.stderr)
            return 3
        except ValueError as e:
            print(f"gpfm-extract: error: {e}", file=sys.stderr)
            return 2
        if not result.skipped:
            rate = result.num_tiles / max(result.seconds, 1e-9)
            print(f"{result.num_tiles} tiles -> {result.out if share.alone else f'part {share.index} of {result.out}'}"
                  f" ({rate:.1f} tiles/s); {len(result.failed)} unreadable skipped")
        if result.incomplete:
            print(f"gpfm-extract: {result.out}: other processes' parts are missing; rerun them to finish",
                  file=sys.stderr)
            return 1
        return 0

    tiling = runner.SlideOptions(tile_size=args.tile_size, magnification=args.magnification, stride=args.stride,
                                 min_tissue=args.min_tissue, default_magnification=args.default_magnification,
                                 cache_dir=args.cache_dir)
    try:
        report = runner.extract_slides(encoder, spec.slides, args.out, tiling, loader, share=share)
    except OutputWriteError as e:  # a full disk stops the run: finished slides are intact, no partial file is left
        print(f"gpfm-extract: error: {e}", file=sys.stderr)
        return 3
    rate = report.num_tiles / max(report.seconds, 1e-9)
    print(f"slides: {len(report.done)} done ({report.num_tiles} tiles, {rate:.1f} tiles/s; {report.pace}), "
          f"{len(report.skipped)} already done, {len(report.failed)} failed")
    for slide, reason in report.failed:
        print(f"  FAILED {slide}: {reason}")
    return 1 if report.failed else 0
