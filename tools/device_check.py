#!/usr/bin/env python
"""A prepared check for a GPU machine (issues 11, 19, 27): one command, one JSON, within one 10-minute call.

    python tools/device_check.py --all --deadline-s 540 --out $OUT/device_check.json   # docs/performance.md

Needs: the repo (configs/, tests/data/), jax with a CUDA plugin; torch + timm (encoder sections) and the official
DINOv2 code with its small needs (vs_official) and grain (train), carried as wheels on the device machines (see
docs/performance.md); no network, no weights (everything randomly initialised). The JSON is rewritten atomically
after every section, so a failure or a time-out keeps what was measured before; a failing section records its error
and the next one runs. Each section's time budget is printed before it starts (BUDGET_S); with --deadline-s a
section whose budget exceeds the time left is skipped (recorded as skipped, not failed).

--all runs, most valuable first:
  env          jax / torch versions, devices, device kind and its published dense bf16 peak.
  vs_official  the official DINOv2/GPFM step and gpfm_jax's side by side on the first GPU: equality of one fp32
               step's losses, then both timed in their own precisions, img/s, peak memory, MFU, ratio
               (tools/bench_vs_official.py in a subprocess; tools/device_official.py).
  step         the official step (configs/gpfm_vitl14.py: ViT-L/14 + UNI / Phikon / CONCH at their real sizes, bf16,
               remat dots_saveable, concatenated crops, cuDNN attention) at --per-device-batch (default 96) on every
               local GPU, random weights and data on device: compile time, s/iteration, img/s per GPU, MFU (model
               FLOPs, no recomputation), measured and planned peak memory, roofline figures.
  levers       the same step with one lever changed at a time: remat none / dots_and_attention_saveable, crops
               not concatenated, XLA attention instead of cuDNN (tools/device_levers.py).
  train        gpfm-train end to end (--train-iters, default 50; the documented command passes 30), random-weight
               teacher bundles, tiles from the bundled slide through grain workers: end-to-end vs step-only img/s,
               data-wait and device-idle shares, host cores (tools/device_train.py).
  profile      the step's program traced for --profile-steps steps: the per-op table profile_ops.json / .md beside
               the JSON (tools/profile_ops.py).
Other sections (issue 11; the H200 figures are in docs/device_check_h200.json): attention (cuDNN vs XLA at ViT-L's
shapes), extraction (encoder tiles/s vs timm), features (bf16 vs fp32, JAX vs timm); --profile / --train add those
sections to env alone. --tiny runs every section at toy sizes on whatever backend jax has (the CPU test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in the later sections
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tools import device_encoder, device_levers, device_official  # noqa: E402
from tools.device_common import Report, Skip, local_target, median_time, peak, step_config, time_step  # noqa: E402


def _devices(n: int | None) -> list:
    devices = jax.local_devices()
    return devices[:n] if n else devices


# ---------------------------------------------------------------------------------------------------------------


def env_section(devices: list) -> dict[str, Any]:
    info = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "devices": len(devices), "peak_bf16_flops": peak(devices[0])}
    stats = devices[0].memory_stats() or {}
    info["bytes_limit"] = stats.get("bytes_limit")
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        info["torch"] = None
    return info


# The step compiles once per run (--profile traces the step section's program, from its last state): key -> the
# compiled tuple, and the latest (state, batch, experts) handed back by the section that used them.
_COMPILED: dict[tuple, tuple] = {}
_INPUTS: dict[tuple, tuple] = {}


def _compiled_step(devices: list, args: argparse.Namespace):
    """(cfg, target, per-device batch, built, traced, compiled, compile_s, (state, data, experts)): the step
    section's program, also what --profile traces. The step donates its state: a caller that keeps stepping hands
    the latest inputs back with `_keep_inputs`, else the next caller gets fresh ones (materialize compiles too)."""
    from gpfm_jax.plan import compile as compile_lib

    key = (tuple(devices), args.tiny, args.per_device_batch)
    if key not in _COMPILED:
        _INPUTS.clear()
        cfg = step_config(args.tiny, len(devices))
        target = local_target(devices)
        batch = args.per_device_batch or (2 if args.tiny else 96)
        built = compile_lib.build(cfg, target, batch, standin_teachers=args.tiny, devices=devices)
        t0 = time.perf_counter()
        with jax.set_mesh(built.step.mesh):
            traced = built.step.jitted.trace(*compile_lib.materialize(built))
            compiled = traced.lower().compile()
        _COMPILED.clear()
        _COMPILED[key] = (cfg, target, batch, built, traced, compiled, time.perf_counter() - t0)
    inputs = _INPUTS.pop(key, None) or compile_lib.materialize(_COMPILED[key][3])
    return (*_COMPILED[key], inputs)


def _keep_inputs(devices: list, args: argparse.Namespace, inputs: tuple) -> None:
    _INPUTS[(tuple(devices), args.tiny, args.per_device_batch)] = inputs


def step_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    from gpfm_jax.plan import analysis, roofline

    cfg, target, batch, built, traced, compiled, compile_s, (state, data, experts) = _compiled_step(devices, args)
    flops = roofline.jaxpr_flops(traced.jaxpr)
    model_flops = flops if built.cfg.compute.remat_policy == "none" else analysis.traced_flops(
        cfg, target, batch, "none", args.tiny, devices)
    predicted_peak = analysis.memory_of(compiled, target, 0.0).peak
    step_s, metrics, latest = time_step(compiled, (state, data, experts), args.warmup, args.iters)
    _keep_inputs(devices, args, latest)
    n = len(devices)
    img_s = batch / step_s
    mfu = model_flops / n / step_s / target.peak_bf16_flops
    stats = devices[0].memory_stats() or {}
    hlo = compiled.as_text()
    summary = roofline.summarize(roofline.parse_collectives(hlo, n), target)
    roof = roofline.roofline(flops, summary.seconds, batch, target, analysis.DEFAULT_MFU, analysis.RELEASED_SAMPLES)
    return {
        "config": "configs/demo.py shrunk, stand-in teachers" if args.tiny else "configs/gpfm_vitl14.py",
        "per_device_batch": batch, "devices": n, "mesh": built.mesh_shape, "remat": built.cfg.compute.remat_policy,
        "attention_impl": built.resolved.vit.attention_impl, "compute_dtype": built.resolved.compute_dtype,
        "compile_s": round(compile_s, 2), "iters": args.iters, "step_s": step_s, "img_per_s_per_device": img_s,
        "model_flops_per_step": model_flops, "executed_flops_per_step": flops, "mfu": mfu,
        "peak_bf16_flops": target.peak_bf16_flops, "loss": float(metrics["loss/total"]),
        "measured_peak_bytes": stats.get("peak_bytes_in_use"),
        "planner": {"peak_bytes": predicted_peak, "assumed_mfu": analysis.DEFAULT_MFU,
                    "img_per_s_per_device": roof.img_per_s_per_chip, "step_s": roof.step_s,
                    "collective_bytes": sum(summary.bytes_by_kind.values())},
    }


def profile_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    """The step section's program traced for --profile-steps steps; the per-op table (tools/profile_ops.py) goes
    beside the --out JSON as profile_ops.json / profile_ops.md."""
    from tools import profile_ops

    _, _, batch, built, _, compiled, compile_s, inputs = _compiled_step(devices, args)
    title = (f"Where the step's time goes: {built.cfg.model.vit.embed_dim}-wide ViT, {batch} images/device, "
             f"remat {built.cfg.compute.remat_policy}, {devices[0].device_kind} x{len(devices)}")
    result = profile_ops.profile_step(compiled, inputs, args.profile_steps, max(1, args.warmup), Path(args.out).parent,
                                      title)
    return {"per_device_batch": batch, "compile_s": round(compile_s, 2), **result}


def attention_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    from gpfm_jax.models import attention

    on_gpu = devices[0].platform == "gpu"
    b, n, h, d = (2, 9, 2, 8) if args.tiny else (64, 257, 16, 64)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    flash = "cudnn" if on_gpu else "xla"  # off a GPU: the same padding + key mask through XLA
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(dtype) for kk in keys)

    def run(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    padded = jax.jit(lambda: run(lambda q, k, v: attention.padded_attention(q, k, v, flash)))
    plain = jax.jit(lambda: run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")))
    got, want = padded(), plain()
    diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - w.astype(jnp.float32)))) for a, w in zip(got, want)]
    scale = [float(jnp.max(jnp.abs(w.astype(jnp.float32)))) for w in want]
    repeats = 3 if args.tiny else 20
    t_flash = median_time(lambda: jax.block_until_ready(padded()), repeats)
    t_xla = median_time(lambda: jax.block_until_ready(plain()), repeats)
    return {"impl": f"{flash} (padded to even, key mask)", "shape_bthd": [b, n, h, d], "dtype": jnp.dtype(dtype).name,
            "max_abs_diff": dict(zip(("out", "dq", "dk", "dv"), diffs)),
            "max_abs_reference": dict(zip(("out", "dq", "dk", "dv"), scale)),
            "fwd_bwd_s": {"flash": t_flash, "xla": t_xla}, "speedup": t_xla / t_flash}


BUDGET_S = {  # seconds each section may take on one H100/H200 (printed; under --deadline-s a section whose
    # budget exceeds the time left is skipped). Measured on the H200 (issue 11) or estimated from its parts.
    "env": 10, "vs_official": 240, "step": 75, "levers": 4 * device_levers.VARIANT_BUDGET_S, "profile": 60,
    "train": 150, "attention": 30, "extraction": 30, "features": 30}
ALL = "env,vs_official,step,levers,train,profile"  # --all: the issue-27 run, most valuable first (the profile,
# cheaper, still fits when the train section was skipped)


def _train(out_dir: Path, args: argparse.Namespace, devices: list) -> dict[str, Any]:
    import importlib.util

    from tools import device_train

    if importlib.util.find_spec("grain") is None:
        raise Skip("needs grain (gpfm-train's data pipeline): carry its wheel (docs/performance.md)")
    return device_train.section(out_dir, args, len(devices))


def main(argv: list[str] | None = None) -> int:
    from tools import device_train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file (the lead passes $OUT/device_check.json)")
    parser.add_argument("--per-device-batch", type=int, default=None, help="default: 96 (the recipe); tiny: 2")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--extract-batch", type=int, default=256)
    parser.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    parser.add_argument("--sections", default=None, help="default: env,step,attention,extraction,features; "
                        "with --profile / --train and no --sections: env and those")
    parser.add_argument("--all", action="store_true", help=f"the sections {ALL} (issue 27)")
    parser.add_argument("--deadline-s", type=float, default=None, help="skip a section whose budget exceeds the "
                        "seconds left (counted from the start); the device command passes 540")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU test)")
    parser.add_argument("--profile", action="store_true", help="add the profile section (per-op table)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps traced by --profile")
    parser.add_argument("--train", action="store_true", help="add the train section (gpfm-train end to end)")
    parser.add_argument("--levers", default=None, help=f"levers section variants (default all: "
                        f"{','.join(device_levers.VARIANTS)})")
    parser.add_argument("--official-batches", default="64,48,32,16", help="vs_official: per-device batches to try")
    device_train.add_arguments(parser)
    args = parser.parse_args(argv)
    extra = [name for name, on in (("profile", args.profile), ("train", args.train)) if on]
    if args.all:
        args.sections = ",".join([*ALL.split(","), *(s for s in (args.sections or "").split(",")
                                                     if s and s not in ALL.split(","))])
    elif args.sections is None:
        args.sections = ",".join(["env", *extra]) if extra else "env,step,attention,extraction,features"
    else:
        args.sections = ",".join([*args.sections.split(","), *(e for e in extra if e not in args.sections.split(","))])
    devices = _devices(args.devices)
    out_dir = Path(args.out).parent
    report = Report(Path(args.out), args.deadline_s)
    report.data["argv"] = sys.argv[1:] if argv is None else list(argv)
    report.data["tiny"] = args.tiny
    left = report.left_s
    sections = {
        "env": lambda: env_section(devices),
        "vs_official": lambda: device_official.section(out_dir, args, min(left() or 1e9, 1.25 * BUDGET_S[
            "vs_official"])),
        "step": lambda: step_section(devices, args),
        "levers": lambda: device_levers.section(devices, args, report.data["sections"].get("step"), left,
                                                lambda: _compiled_step(devices, args)[-1],
                                                lambda held: _keep_inputs(devices, args, held)),
        "attention": lambda: attention_section(devices, args),
        "extraction": lambda: device_encoder.extraction_section(devices, args),
        "features": lambda: device_encoder.features_section(devices, args),
        "profile": lambda: profile_section(devices, args),
        "train": lambda: _train(out_dir, args, devices),
    }
    for name in args.sections.split(","):
        if name not in sections:
            parser.error(f"unknown section {name!r}; known: {', '.join(sections)}")
    for name in args.sections.split(","):
        report.section(name, sections[name], BUDGET_S[name])
    failed = [k for k, v in report.data["sections"].items() if v["ok"] is False]
    skipped = [k for k, v in report.data["sections"].items() if v["ok"] is None]
    print(f"[device_check] wrote {args.out}" + (f"; failed sections: {failed}" if failed else "")
          + (f"; skipped: {skipped}" if skipped else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
