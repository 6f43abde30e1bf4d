#!/usr/bin/env python
"""Forward cost of the three expert teachers vs the student forward, on the same batch of 224x224 crops.

    python tools/bench_teachers.py --batch 4 [--dtype float32] [--repeats 3] [--unscanned]

Real sizes, random weights, jitted. Prints, per model: compile time, median forward time, analytic GFLOP per image, and the ratio to the student's forward (ViT-L/14 at 224, `ViTConfig()` defaults). "all teachers" is the
whole `teacher_targets` call of the training step (3 forwards + patch-grid upsampling).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from gpfm_jax.models.vit import ViTConfig, VisionTransformer
from gpfm_jax.models.teachers import TEACHERS, build_teacher, random_params, teacher_targets


def vit_gflop(cfg: ViTConfig, image_size: int, pooler=None) -> float:
    """Matmul FLOPs of one forward per image (2 per multiply-add): patch embed, per block qkv/proj/MLP (24 N D^2 at
    mlp ratio 4) and attention (4 N^2 D), plus the attentional pooler if any."""
    grid = image_size // cfg.patch_size
    n, d = grid * grid + 1 + cfg.num_register_tokens, cfg.embed_dim
    flops = 2 * grid * grid * cfg.patch_size**2 * cfg.in_chans * d
    flops += cfg.depth * (2 * n * d * (3 * d + d + 2 * cfg.mlp_hidden_dim) + 4 * n * n * d)
    if pooler is not None:
        flops += 2 * n * cfg.embed_dim * 2 * pooler.dim + 4 * pooler.num_queries * n * pooler.dim
        flops += 2 * pooler.num_queries * pooler.dim * (2 * pooler.dim + (pooler.proj_dim or 0))
    return flops / 1e9


def _compile(fn, args) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up
    return compiled, compile_s


def _interleaved_medians(calls: list[tuple[Any, tuple]], repeats: int) -> list[float]:
    """Median seconds of each call, timed in interleaved rounds (a shared machine's load hits all alike)."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, (compiled, args) in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", help="compute dtype of every model (float32, bfloat16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unscanned", action="store_true", help="unrolled blocks (default: nn.scan, faster compile)")
    parser.add_argument("--teachers", default="uni,phikon,conch")
    args = parser.parse_args(argv)
    scan = not args.unscanned
    names = [n for n in args.teachers.split(",") if n]
    images = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    print(f"devices: {jax.devices()}; batch {args.batch}x{args.size}x{args.size}, dtype {args.dtype}, "
          f"scan_layers={scan}, median of {args.repeats}")

    entries = []  # (name, fn, args, gflop per image)
    student = VisionTransformer(ViTConfig(dtype=args.dtype, scan_layers=scan))
    student_params = random_params(student, (1, 224, 224, 3), seed=0)
    entries.append(("student ViT-L/14", lambda p, x: student.apply({"params": p}, x)["cls"], student_params,
                    vit_gflop(student.cfg, args.size)))
    teachers, params = {}, {}
    for i, name in enumerate(names):
        teacher = build_teacher(TEACHERS[name], dtype=args.dtype, scan_layers=scan)
        teachers[name], params[name] = teacher, teacher.init_params(seed=i + 1)
        fn = (lambda t: lambda p, x: t.apply(p, x)[t.spec.cls_output])(teacher)
        entries.append((f"teacher {name}", fn, params[name], vit_gflop(teacher.spec.vit, args.size, teacher.spec.pooler)))
    total_gflop = sum(e[3] for e in entries[1:])
    entries.append(("all teachers (teacher_targets)", lambda p, x: teacher_targets(teachers, p, x), params, total_gflop))

    compiled = [_compile(fn, (p, images)) for _, fn, p, _ in entries]
    medians = _interleaved_medians([(c, (e[2], images)) for (c, _), e in zip(compiled, entries)], args.repeats)
    student_s = medians[0]
    print(f"{'model':32s} {'compile s':>9s} {'forward s':>9s} {'ms/img':>8s} {'GFLOP/img':>9s} {'GFLOP/s':>8s} "
          f"{'x student':>9s}")
    for (name, _, _, gflop), (_, compile_s), run_s in zip(entries, compiled, medians):
        print(f"{name:32s} {compile_s:9.1f} {run_s:9.3f} {1000 * run_s / args.batch:8.1f} {gflop:9.1f} "
              f"{gflop * args.batch / run_s:8.1f} {run_s / student_s:9.2f}")
    print(f"FLOP ratio all teachers / student forward: {total_gflop / entries[0][3]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
