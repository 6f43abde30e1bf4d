#!/usr/bin/env python
"""Figures for the GPFM training step (scripts, not tests).

    python tools/bench_step.py memory [--batch 8]   # full ViT-L/14 step + real-size UNI/Phikon/CONCH, scanned:
                                                    # per-device memory on 1 vs 8 fake devices, compile time
    python tools/bench_step.py flops [--batch 8]    # the same step unscanned: XLA cost_analysis FLOPs next to
                                                    # the analytic count
    python tools/bench_step.py mfu [--batch 4]      # small config: step throughput and MFU against the f32 matmul
                                                    # peak measured in the same run

Every step here is the one gpfm-train runs for the recipe's config (configs/gpfm_vitl14.py, changed only where a
line says so), assembled by the run's own code (gpfm_jax/train/assembly.py, through gpfm-plan's build). Nothing is
allocated for `memory` and `flops`: the step is lowered and compiled on ShapeDtypeStructs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_common import local_target, step_config  # noqa: E402

from gpfm_jax.models.vit import ViTConfig  # noqa: E402
from gpfm_jax.plan import compile as compile_lib  # noqa: E402
from gpfm_jax.step import sharding  # noqa: E402
from gpfm_jax.step.model import GPFMModel, HeadConfig  # noqa: E402
from gpfm_jax.train.config_schema import replace_fields  # noqa: E402


def vit_forward_flops(cfg: ViTConfig, height: int, width: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image through the ViT: patch embed, qkv/proj/MLP, attention."""
    n_patches = (height // cfg.patch_size) * (width // cfg.patch_size)
    n = n_patches + 1 + cfg.num_register_tokens
    d, hidden = cfg.embed_dim, cfg.mlp_hidden_dim
    ffn = (2 * d * hidden + hidden * d) if cfg.ffn == "swiglu" else 2 * d * hidden
    per_layer = 2 * n * (3 * d * d + d * d + ffn) + 2 * 2 * n * n * d
    return cfg.depth * per_layer + 2 * n_patches * cfg.patch_size**2 * cfg.in_chans * d


def head_flops(heads: HeadConfig, d: int, rows: float) -> float:
    h = heads
    return 2 * rows * (d * h.hidden_dim + h.hidden_dim * h.hidden_dim + h.hidden_dim * h.bottleneck_dim
                       + h.bottleneck_dim * h.out_dim)


def analytic_step_flops(model: GPFMModel, batch: int, n_local: int, local_size: int, masked: float) -> float:
    """Student fwd+bwd (x3) on 2 global + n_local local crops and heads, EMA teacher fwd, experts fwd."""
    v = model.vit
    g = vit_forward_flops(v, v.img_size, v.img_size)
    loc = vit_forward_flops(v, local_size, local_size)
    heads = head_flops(model.heads, v.embed_dim, 2 * batch + n_local * batch + masked)
    student = 3 * (2 * batch * g + n_local * batch * loc + heads)
    ema = 2 * batch * g + head_flops(model.heads, v.embed_dim, 2 * batch + masked)
    experts = sum(2 * batch * vit_forward_flops(t.spec.vit, v.img_size, v.img_size) for t in model.experts.values())
    return student + ema + experts


def _build(cfg, devices: list, batch: int) -> compile_lib.Built:
    """The step gpfm-train runs for `cfg` on `devices` at global batch `batch`, assembled by the run's own code
    (train/assembly.py through the planner's build: abstract experts at their real sizes, nothing allocated)."""
    cfg = replace_fields(cfg, {"data.global_batch_size": batch})
    return compile_lib.build(cfg, local_target(devices), devices=devices)


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _full_size(scan: bool, remat: str, fsdp: int = 1, data: int = -1):
    """The recipe's config (configs/gpfm_vitl14.py): ViT-L/14 student, real-size UNI / Phikon / CONCH."""
    return replace_fields(step_config(False, 8), {"compute.scan_layers": scan, "compute.remat_policy": remat,
                                                  "mesh.fsdp": fsdp, "mesh.data": data})


def memory(args) -> None:
    one = _build(_full_size(scan=True, remat="full"), jax.devices()[:1], args.batch)
    state, _, expert_params = one.args
    print(f"full GPFM step (the recipe's config): ViT-L/14 student (scan + remat), UNI/Phikon/CONCH real size, "
          f"global batch {args.batch}; state {_tree_bytes(state) / 2**30:.2f} GiB, experts "
          f"{_tree_bytes(expert_params) / 2**30:.2f} GiB")
    results = {}
    for shape in ((1, 1), (1, 8), (2, 4)):
        n_dev = shape[0] * shape[1]
        built = one if n_dev == 1 else _build(_full_size(True, "full", fsdp=shape[1], data=shape[0]),
                                               jax.devices()[:n_dev], args.batch)
        t0 = time.perf_counter()
        lowered = built.step.lower(*built.args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        shardings = jax.tree_util.tree_leaves(sharding.state_shardings(state, built.step.mesh))
        leaves = jax.tree_util.tree_leaves(state)
        state_per_device = sum(
            int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for s, x in zip(shardings, leaves))
        results[shape] = (mem, state_per_device)
        print(f"[mesh data x fsdp = {shape}] lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s; per device: "
              f"arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, state {state_per_device / 2**30:.3f} GiB, "
              f"temp {mem.temp_size_in_bytes / 2**30:.2f} GiB, output {mem.output_size_in_bytes / 2**30:.2f} GiB")
    total_state, total_args = results[(1, 1)][1], results[(1, 1)][0].argument_size_in_bytes
    for shape in ((1, 8), (2, 4)):
        mem, state_per_device = results[shape]
        print(f"mesh {shape}: per-device state = {state_per_device / (total_state / 8):.3f} x (total / 8), "
              f"arguments (state + batch + experts) = {mem.argument_size_in_bytes / (total_args / 8):.3f} x (total / 8)"
              f"   (target <= 1.15; the data axis replicates the state: HSDP)")


def flops(args) -> None:
    """XLA counts a scanned loop body once, so FLOPs come from the unscanned, un-rematerialised step."""
    built = _build(_full_size(scan=False, remat="none"), jax.devices()[:1], args.batch)
    t0 = time.perf_counter()
    counted = built.step.lower(*built.args).compile().cost_analysis()["flops"]
    mc = built.cfg.data.multicrop
    analytic = analytic_step_flops(built.model, args.batch, mc.num_local_crops, mc.local_size,
                                   built.resolved.step.max_masked)
    print(f"unscanned full step compiled in {time.perf_counter() - t0:.1f} s; model FLOPs per step (global batch "
          f"{args.batch}): analytic {analytic / 1e12:.2f} T, XLA cost_analysis {counted / 1e12:.2f} T, "
          f"ratio {counted / analytic:.3f}")


def _matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def mfu(args) -> None:
    small = replace_fields(step_config(False, 1), {
        "model.vit.embed_dim": 384, "model.vit.depth": 12, "model.vit.num_heads": 6, "model.vit.drop_path_rate": 0.0,
        "model.heads.out_dim": 8192, "model.heads.hidden_dim": 1024, "model.heads.bottleneck_dim": 256,
        "standin.embed_dim": 192, "standin.depth": 4, "standin.num_heads": 4,
        "teachers": {"uni": "standin", "phikon": "standin", "conch": "standin"},
        "compute.scan_layers": False, "compute.remat_policy": "none"})
    built = _build(small, jax.devices()[:1], args.batch)
    compiled_flops = built.step.lower(*built.args).compile().cost_analysis()["flops"]
    state, batch, experts = compile_lib.materialize(built)
    state, m = built.step(state, batch, experts)
    jax.block_until_ready(m)
    times, peaks = [], []
    for _ in range(args.repeats):  # interleave peak and step so that machine noise hits both
        peaks.append(_matmul_peak())
        t = time.perf_counter()
        state, m = built.step(state, batch, experts)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_time, peak = float(np.median(times)), float(np.median(peaks))
    achieved = compiled_flops / step_time
    mc = built.cfg.data.multicrop
    print(f"small config (ViT-S/14 student, 3 stand-in teachers d192 x 4 layers, batch {args.batch} x (2 global + "
          f"{mc.num_local_crops} local), compute {built.resolved.compute_dtype}): {step_time:.2f} s/step, "
          f"{args.batch / step_time:.2f} img/s, {compiled_flops / 1e9:.0f} GFLOP/step")
    print(f"f32 matmul peak {peak / 1e9:.0f} GFLOP/s; step {achieved / 1e9:.0f} GFLOP/s; MFU {achieved / peak:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("memory", "flops", "mfu"))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 4 if args.what == "mfu" else 8
    print(f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices", file=sys.stderr)
    {"memory": memory, "flops": flops, "mfu": mfu}[args.what](args)


if __name__ == "__main__":
    main()
