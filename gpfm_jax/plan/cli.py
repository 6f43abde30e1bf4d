"""gpfm-plan: compile the GPFM training step for a TPU / GPU slice on this (CPU) machine and read off whether it
fits, what it communicates, and how fast it could run.

    gpfm-plan --config configs/gpfm_vitl14.py --target v5p-8 [--per-device-batch 96] [--remat POLICY] [--search]
              [--json OUT] [--hlo OUT] [--mfu 0.3] [--samples N] [--margin 0.1] [--standin-teachers]
              [--config.<field>=<value> ...]

`--config.<field>=<value>` overrides a config field exactly as gpfm-train takes them (e.g. --config.mesh.fsdp=8).
Targets: v4-8, v5p-8, v5e-8, v6e-8 (pip install -e ".[tpu]"), h100-8, h100-16, h200-1, h200-8
(pip install -e ".[gpu]"), cpu-8.
See docs/plan.md. Exit status: 0 fits, 3 does not fit (or no policy fits with --search), 2 bad arguments,
1 compile failure.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "gpfm_vitl14.py"


def load_config(path: str | Path):
    """get_config() of a config file (what gpfm-train's --config reads)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"gpfm_plan_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path}: no get_config() in the file")
    return module.get_config()


def _coerce(value: str, current: Any) -> Any:
    if isinstance(current, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, (tuple, list)):
        return type(current)(ast.literal_eval(value))
    return value


def apply_overrides(cfg, overrides: Sequence[str]) -> None:
    """--config.a.b=value pairs onto the ConfigDict, typed like the current value."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unrecognised argument {item!r} (overrides look like --config.mesh.fsdp=8)")
        key, value = item[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if p not in node:
                raise ValueError(f"--config.{key}: no field {p!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"--config.{key}: no field {leaf!r}")
        try:
            node[leaf] = _coerce(value, node[leaf])
        except ValueError as err:
            raise ValueError(f"--config.{key}: {err}") from err


def _parser() -> argparse.ArgumentParser:
    from gpfm_jax.plan import analysis
    from gpfm_jax.plan.targets import TARGETS

    p = argparse.ArgumentParser(prog="gpfm-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config file (default: the official "
                   "ViT-L/14 recipe)")
    p.add_argument("--target", required=True, choices=sorted(TARGETS))
    p.add_argument("--per-device-batch", type=int, default=None,
                   help="images per chip (default: config.data.global_batch_size / chips)")
    p.add_argument("--remat", default=None, help="none | full | a jax.checkpoint_policies name (default: the "
                   "config's compute.remat_policy)")
    p.add_argument("--search", action="store_true", help="cheapest remat policy that fits the batch, and the "
                   "largest batch it allows")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--mfu", type=float, default=analysis.DEFAULT_MFU, help="assumed model FLOPs utilisation")
    p.add_argument("--samples", type=float, default=analysis.RELEASED_SAMPLES,
                   help="images seen in training, for the days estimate (default: the released model's)")
    p.add_argument("--margin", type=float, default=analysis.DEFAULT_MARGIN, help="share of HBM kept free")
    p.add_argument("--hlo", default=None, help="write the compiled (partitioned, per-device) HLO text here")
    p.add_argument("--standin-teachers", action="store_true", help="tiny random expert teachers instead of UNI / "
                   "Phikon / CONCH at their real sizes")
    return p


def _write_json(path: str, payload: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, out)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    from gpfm_jax.plan.targets import prepare_environment

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plan never runs anything; no accelerator probing
    prepare_environment()
    args, overrides = _parser().parse_known_args(argv)
    from gpfm_jax.plan import analysis, search
    from gpfm_jax.plan.targets import get_target, missing_requirement

    target = get_target(args.target)
    problem = missing_requirement(target)
    if problem:  # before the config is loaded or anything compiles: one line naming the extra
        print(f"gpfm-plan: {problem}", file=sys.stderr)
        return 2
    from gpfm_jax.train.config_schema import parse

    try:
        config_dict = load_config(args.config)
        apply_overrides(config_dict, overrides)
        cfg = parse(config_dict)  # once, here: the planner passes the typed config on
    except ValueError as err:  # ConfigError is a ValueError
        print(f"gpfm-plan: {err}", file=sys.stderr)
        return 2
    batch = args.per_device_batch or max(1, cfg.data.global_batch_size // target.chips)
    try:
        if args.search:
            result = search.search(cfg, target, batch, standin_teachers=args.standin_teachers, mfu=args.mfu,
                                   samples=args.samples, margin=args.margin, log=print)
            if result.plan is not None:
                print(analysis.format_report(result.plan, target))
            last = result.policies[-1].remat
            print(f"gpfm-plan --search: {target.name} at {batch} images/device: "
                  + (f"remat {result.chosen}, largest batch {result.max_batch}/device" if result.chosen
                     else f"no remat policy fits; with remat {last} the largest batch is {result.max_batch}/device"))
            payload, ok = result.to_dict(), result.chosen is not None
            candidates = search.worth_accumulating(result)
            if candidates and not args.per_device_batch:  # the config's global batch, in microbatches
                why = ("no policy fits it" if result.chosen is None else
                       f"only {result.chosen} fits it, at {search.ACCUMULATION_SAVING:.0%} or more FLOPs above "
                       f"{candidates[0]}")
                print(f"gpfm-plan --search: the global batch {cfg.data.global_batch_size} in microbatches "
                      f"(exact gradient accumulation; {why}):")
                acc = search.accumulation(cfg, target, policies=candidates, standin_teachers=args.standin_teachers,
                                          mfu=args.mfu, samples=args.samples, margin=args.margin, log=print)
                payload["accumulation"] = acc.to_dict()
                ok = ok or acc.microbatches > 0
                print(format_accumulation(acc, args.config) if acc.microbatches or result.chosen is None else
                      f"gpfm-plan --search: no cheaper policy runs it in microbatches; remat {result.chosen} it is")
        else:
            hlo: list[str] = []
            plan = analysis.plan_point(cfg, target, batch, args.remat, args.standin_teachers, args.mfu,
                                       args.samples, args.margin, keep_hlo=hlo)
            if args.hlo and hlo:
                Path(args.hlo).write_text(hlo[0])
            print(analysis.format_report(plan, target))
            payload, ok = plan.to_dict(), plan.memory.fits
            if plan.error:
                if args.json:
                    _write_json(args.json, payload)
                return 1
    except Exception as err:  # configuration problems surface as ConfigError / ValueError / RuntimeError
        from gpfm_jax.train.config import ConfigError

        if isinstance(err, (ConfigError, RuntimeError, ValueError)):
            print(f"gpfm-plan: {err}", file=sys.stderr)
            return 2
        raise
    if args.json:
        _write_json(args.json, payload)
    return 0 if ok else 3


def format_accumulation(acc, config: str) -> str:
    if not acc.microbatches:
        return (f"gpfm-plan --search: {acc.target}: the batch of {acc.global_batch} does not fit with any remat "
                "policy and microbatch count; more chips, or a smaller global batch")
    chunk = acc.per_device_batch // acc.microbatches
    return (f"gpfm-plan --search: {acc.target} runs the {acc.global_batch} batch as {acc.microbatches} "
            f"microbatch(es) of {chunk}/device ({acc.per_device_batch}/device per step) with remat {acc.remat}: peak "
            f"{acc.peak / 2**30:.2f} GiB, roofline {acc.img_per_s_per_chip:.1f} images/s per chip\n"
            f"  gpfm-train --config {config} {acc.command} ...")


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
