"""Time the official step on this machine's GPUs under each MFU lever (issue 19): remat policy, concatenated crops,
scanned vs unrolled blocks. Deviceless compiles (gpfm-plan, docs/plan.md "Levers") say what fits and what each
variant executes; only a device says what it gains. One JSON line per variant, and all of them in --out.

    python tools/bench_levers.py --out OUT/levers.json                      # ~1 min per variant on one H200
    python tools/bench_levers.py --out OUT/levers.json --variants dots,dots_attn,none,none_concat
    XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true python tools/bench_levers.py ...   # 8 GPUs: LHS

Each variant: the official config (configs/gpfm_vitl14.py, FSDP reduced to the GPUs present) at --per-device-batch,
random weights and data on device, compiled, --warmup then --iters timed steps; MFU on model FLOPs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_TWO = {"compute.concat_crops": False}  # the student's crops as two forwards (the config's default is True)
_CONCAT = {"compute.concat_crops": True}
VARIANTS = {  # name: (remat policy, config overrides)
    "dots": ("dots_saveable", _TWO),
    "dots_attn": ("dots_and_attention_saveable", _TWO),
    "none": ("none", _TWO),
    "dots_concat": ("dots_saveable", _CONCAT),
    "dots_attn_concat": ("dots_and_attention_saveable", _CONCAT),
    "none_concat": ("none", _CONCAT),
    "dots_unrolled": ("dots_saveable", {**_TWO, "compute.scan_layers": False}),
}


def run_variant(name: str, batch: int, iters: int, warmup: int, devices: list) -> dict:
    from gpfm_jax.plan import analysis, roofline
    from gpfm_jax.plan import compile as compile_lib
    from gpfm_jax.plan.cli import load_config
    from gpfm_jax.train.config_schema import parse
    from tools.device_common import local_target, time_step

    remat, overrides = VARIANTS[name]
    raw = load_config(REPO / "configs" / "gpfm_vitl14.py")
    raw.mesh.fsdp = math.gcd(int(raw.mesh.fsdp), len(devices))
    for key, value in overrides.items():
        section, field = key.split(".")
        raw[section][field] = value
    cfg = parse(raw)
    target = local_target(devices)
    built = compile_lib.build(cfg, target, batch, remat, devices=devices)
    inputs = compile_lib.materialize(built)
    t0 = time.perf_counter()
    with jax.set_mesh(built.step.mesh):
        traced = built.step.jitted.trace(*inputs)
        compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    model_flops = analysis.traced_flops(cfg, target, batch, "none", False, devices)
    step_s, metrics, _ = time_step(compiled, inputs, warmup, iters)
    return {"variant": name, "remat": remat, **{k: v for k, v in overrides.items()}, "per_device_batch": batch,
            "devices": len(devices), "compile_s": round(compile_s, 1), "step_s": step_s,
            "img_per_s_per_device": batch / step_s, "executed_flops": roofline.jaxpr_flops(traced.jaxpr),
            "mfu": model_flops / len(devices) / step_s / target.peak_bf16_flops,
            "predicted_peak_bytes": analysis.memory_of(compiled, target, 0.0).peak,
            # the process's high-water mark so far: this variant's own peak only when it is the largest yet
            "measured_peak_bytes_so_far": (devices[0].memory_stats() or {}).get("peak_bytes_in_use"),
            "loss": float(metrics["loss/total"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="dots,dots_attn,none,dots_concat,none_concat,dots_unrolled")
    p.add_argument("--per-device-batch", type=int, default=96)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    devices = jax.local_devices()
    out, results = Path(args.out), []
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        try:
            result = run_variant(name, args.per_device_batch, args.iters, args.warmup, devices)
        except Exception as err:  # noqa: BLE001 - an out-of-memory variant is a result; carry on
            result = {"variant": name, "error": f"{type(err).__name__}: {err}"[:1000]}
        results.append(result)
        print(json.dumps(result), flush=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
