#!/usr/bin/env python
"""Figures for the GPFM training step (scripts, not tests).

    python tools/bench_step.py memory [--batch 8]   # full ViT-L/14 step + real-size UNI/Phikon/CONCH, scanned:
                                                    # per-device memory on 1 vs 8 fake devices, compile time
    python tools/bench_step.py flops [--batch 8]    # the same step unscanned: XLA cost_analysis FLOPs next to
                                                    # the analytic count
    python tools/bench_step.py mfu [--batch 4]      # small config: step throughput and MFU against the f32 matmul
                                                    # peak measured in the same run

Nothing is allocated for `memory`: the step is lowered and compiled on ShapeDtypeStructs.
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

from gpfm_jax.data.augment import MultiCropConfig  # noqa: E402
from gpfm_jax.data.batch import batch_spec  # noqa: E402
from gpfm_jax.data.masking import MaskingConfig, max_masked_tokens  # noqa: E402
from gpfm_jax.data.pipeline import PipelineConfig  # noqa: E402
from gpfm_jax.models.vit import ViTConfig  # noqa: E402
from gpfm_jax.models.teachers import TEACHERS, build_teacher, standin_spec  # noqa: E402
from gpfm_jax.step import sharding  # noqa: E402
from gpfm_jax.step.model import GPFMModel, HeadConfig  # noqa: E402
from gpfm_jax.step.optim import OptimConfig, make_optimizer  # noqa: E402
from gpfm_jax.step.schedules import ScheduleConfig, make_schedules  # noqa: E402
from gpfm_jax.step.train_step import StepConfig, init_state, jit_train_step, make_train_step  # noqa: E402


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


def _build(vit: ViTConfig, heads: HeadConfig, experts: dict, batch: int, n_local: int, local: int):
    model = GPFMModel(vit, heads, experts)
    sched = make_schedules(ScheduleConfig(), batch)
    tx = make_optimizer(jax.eval_shape(model.init_student, jax.random.key(0)), sched, OptimConfig())
    max_masked = max_masked_tokens(2 * batch, MaskingConfig(grid=(vit.grid_size, vit.grid_size)))
    step = make_train_step(model, sched, tx, StepConfig(n_local=n_local, max_masked=max_masked))
    state = jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0)))
    expert_params = {name: jax.eval_shape(t.init_params) for name, t in experts.items()}
    crops = MultiCropConfig(global_size=vit.img_size, local_size=local, num_local_crops=n_local)
    batch_shapes = batch_spec(PipelineConfig(crop_dtype="float32", multicrop=crops), vit.patch_size, batch)
    return model, step, state, expert_params, batch_shapes, max_masked


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _full_size(scan: bool, remat: str):
    vit = ViTConfig(scan_layers=scan, remat_policy=remat)
    experts = {name: build_teacher(TEACHERS[name], scan_layers=scan, remat_policy=remat) for name in TEACHERS}
    return vit, experts


def memory(args) -> None:
    vit, experts = _full_size(scan=True, remat="full")
    model, step, state, expert_params, batch_shapes, max_masked = _build(vit, HeadConfig(), experts, args.batch, 8, 98)
    print(f"full GPFM step: ViT-L/14 student (scan + remat), UNI/Phikon/CONCH real size, global batch {args.batch}; "
          f"state {_tree_bytes(state) / 2**30:.2f} GiB, experts {_tree_bytes(expert_params) / 2**30:.2f} GiB")
    results = {}
    for shape in ((1, 1), (1, 8), (2, 4)):
        n_dev = shape[0] * shape[1]
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[:n_dev])
        sharded = jit_train_step(step, mesh, state, expert_params)
        t0 = time.perf_counter()
        lowered = sharded.lower(state, batch_shapes, expert_params)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        shardings = jax.tree_util.tree_leaves(sharding.state_shardings(state, mesh))
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
    vit, experts = _full_size(scan=False, remat="none")
    model, step, state, expert_params, batch_shapes, max_masked = _build(vit, HeadConfig(), experts, args.batch, 8, 98)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    t0 = time.perf_counter()
    compiled = jit_train_step(step, mesh, state, expert_params).lower(state, batch_shapes, expert_params).compile()
    counted = compiled.cost_analysis()["flops"]
    analytic = analytic_step_flops(model, args.batch, 8, 98, max_masked)
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
    vit = ViTConfig(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.0)
    experts = {name: build_teacher(standin_spec(name, embed_dim=192, depth=4, num_heads=4)) for name in TEACHERS}
    heads = HeadConfig(out_dim=8192, hidden_dim=1024, bottleneck_dim=256)
    model, step, state, expert_params, batch_shapes, max_masked = _build(vit, heads, experts, args.batch, 8, 98)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    sharded = jit_train_step(step, mesh, state, expert_params)
    compiled_flops = sharded.lower(state, batch_shapes, expert_params).compile().cost_analysis()["flops"]
    real_state = init_state(model, make_optimizer(state.params, make_schedules(ScheduleConfig(), args.batch),
                                                  OptimConfig()), jax.random.key(0))
    real_experts = {name: t.init_params(1) for name, t in experts.items()}
    rng = np.random.default_rng(0)
    batch = {k: (rng.random(s.shape) < 0.2) if s.dtype == jnp.bool_ else rng.normal(size=s.shape).astype(np.float32)
             for k, s in batch_shapes.items()}
    st, m = sharded(real_state, batch, real_experts)
    jax.block_until_ready(m)
    times, peaks = [], []
    for _ in range(args.repeats):  # interleave peak and step so that machine noise hits both
        peaks.append(_matmul_peak())
        t = time.perf_counter()
        st, m = sharded(st, batch, real_experts)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_time, peak = float(np.median(times)), float(np.median(peaks))
    achieved = compiled_flops / step_time
    print(f"small config (ViT-S/14 student, 3 stand-in teachers d192 x 4 layers, batch {args.batch} x (2 global + 8 local)): "
          f"{step_time:.2f} s/step, {args.batch / step_time:.2f} img/s, {compiled_flops / 1e9:.0f} GFLOP/step")
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
