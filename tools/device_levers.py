"""tools/device_check.py's levers section (issue 27): the official step with one MFU lever changed at a time, timed
on this machine's devices exactly as the step section times the config itself.

The config (configs/gpfm_vitl14.py: remat dots_saveable, concatenated crops, attention "auto" = cuDNN flash attention
on a GPU in bf16) is the step section's row; each variant here changes one thing:

    remat_none        compute.remat_policy = "none"  (no recomputation: fastest if it fits)
    remat_dots_attn   compute.remat_policy = "dots_and_attention_saveable"  (the attention output kept too)
    no_concat_crops   compute.concat_crops = False  (the student's global and local crops as two forwards)
    attention_xla     model.vit.attention_impl = "xla"  (XLA's attention instead of cuDNN's; the CPU's "auto" is
                      the per-sample loop)

Variants run in that order (most informative first); under a deadline the ones that no longer fit are skipped. A
variant that fails (out of memory) is a result: its error is recorded and the next one runs. Peak memory per variant
is the compiled program's (gpfm-plan's accounting: XLA's memory analysis), since JAX's measured peak is a process
high-water mark.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax

from tools.device_common import local_target, step_config, time_step

VARIANTS = {
    "remat_none": {"compute.remat_policy": "none"},
    "remat_dots_attn": {"compute.remat_policy": "dots_and_attention_saveable"},
    "no_concat_crops": {"compute.concat_crops": False},
    "attention_xla": {"model.vit.attention_impl": "xla"},
}
VARIANT_BUDGET_S = 50  # compile (~20-30 s for ViT-L on an H200) + warm-up + timed steps


def run_variant(devices: list, args: argparse.Namespace, changes: dict[str, Any], model_flops: float | None,
                iters: int, inputs: tuple) -> tuple[dict[str, Any], tuple]:
    """The variant's step compiled and timed on `inputs` (the step section's state, batch and experts: no lever
    changes their shapes or shardings); returns its figures and the inputs to hand on (the state is donated)."""
    from gpfm_jax.plan import analysis
    from gpfm_jax.plan import compile as compile_lib

    cfg = step_config(args.tiny, len(devices), changes)
    target = local_target(devices)
    batch = args.per_device_batch or (2 if args.tiny else 96)
    built = compile_lib.build(cfg, target, batch, standin_teachers=args.tiny, devices=devices)
    t0 = time.perf_counter()
    with jax.set_mesh(built.step.mesh):
        compiled = built.step.jitted.trace(*inputs).lower().compile()
    compile_s = time.perf_counter() - t0
    if model_flops is None:  # the same for every variant: the step's matmul FLOPs without recomputation
        model_flops = analysis.traced_flops(cfg, target, batch, "none", args.tiny, devices)
    step_s, metrics, latest = time_step(compiled, inputs, max(1, args.warmup), iters)
    return {"changes": changes, "remat": built.cfg.compute.remat_policy, "concat_crops": built.cfg.compute.concat_crops,
            "attention_impl": built.resolved.vit.attention_impl,
            "per_device_batch": batch, "compile_s": round(compile_s, 2), "iters": iters, "step_s": step_s,
            "img_per_s_per_device": batch / step_s, "model_flops_per_step": model_flops,
            "mfu": model_flops / len(devices) / step_s / target.peak_bf16_flops,
            "program_peak_bytes": analysis.memory_of(compiled, target, 0.0).peak,
            "loss": float(metrics["loss/total"])}, latest


def section(devices: list, args: argparse.Namespace, baseline: dict[str, Any] | None,
            left_s: Callable[[], float | None], inputs: Callable[[], tuple],
            keep: Callable[[tuple], None]) -> dict[str, Any]:
    """Every variant (or those that fit the time left), each beside the step section's figures (`baseline`); a
    variant that is the config itself is not run again. `inputs()` / `keep(...)`: the step section's arrays."""
    names = args.levers.split(",") if args.levers else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown levers {unknown}; known: {', '.join(VARIANTS)}")
    base_img_s = (baseline or {}).get("img_per_s_per_device")
    model_flops = (baseline or {}).get("model_flops_per_step")
    out: dict[str, Any] = {"baseline": {k: (baseline or {}).get(k) for k in (
        "remat", "attention_impl", "per_device_batch", "img_per_s_per_device", "mfu")}, "variants": {}}
    for name in names:
        left = left_s()
        if left is not None and left < VARIANT_BUDGET_S:
            out["variants"][name] = {"skipped": f"{left:.0f} s left, a variant's budget is {VARIANT_BUDGET_S} s"}
            continue
        config = step_config(args.tiny, len(devices))
        if step_config(args.tiny, len(devices), VARIANTS[name]) == config:
            out["variants"][name] = {"changes": VARIANTS[name], "same_as_config": True}
            continue
        print(f"[device_check] levers/{name}: budget {VARIANT_BUDGET_S} s", flush=True)
        t0 = time.perf_counter()
        try:
            r, held = run_variant(devices, args, VARIANTS[name], model_flops, min(args.iters, 3 if args.tiny else 10),
                                  inputs())
            keep(held)
            model_flops = r["model_flops_per_step"]
            if base_img_s:
                r["speedup_vs_config"] = r["img_per_s_per_device"] / base_img_s
        except Exception as err:  # noqa: BLE001 - an out-of-memory variant is a result; carry on
            r = {"changes": VARIANTS[name], "error": f"{type(err).__name__}: {err}"[:1000]}
        r["seconds"] = round(time.perf_counter() - t0, 2)
        out["variants"][name] = r
        print(f"[device_check] levers/{name}: {r.get('img_per_s_per_device', r.get('error'))}", flush=True)
    return out
