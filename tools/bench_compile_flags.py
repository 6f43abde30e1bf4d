#!/usr/bin/env python
"""What XLA's CPU compile flags cost and save on a training step (a script, not a test).

    python tools/bench_compile_flags.py [--config configs/demo.py] [--iters 3]

The test suite compiles hundreds of programs on the CPU and runs most of them only a few times, so it compiles with
cheaper flags than XLA's defaults (tests/xla_flags.py). This measures, for each flag set in a fresh process kept to
one core (as each pytest-xdist worker is): the step's trace, its compile, and the steady time of one step, with the
first step's loss, so a flag set that changes what the step computes shows. The step is the one gpfm-train assembles
for the config on one CPU device, with stand-in teachers (gpfm-plan's build).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from xla_flags import CHEAP_LLVM, FAST_COMPILE  # noqa: E402  (the suite's flags, measured here)

FLAG_SETS = {"xla defaults": "", "cheap llvm": CHEAP_LLVM, "cheap llvm + classic emitters": FAST_COMPILE}


def child(config: str, iters: int) -> dict:
    """One flag set (this process's XLA_FLAGS): trace, compile, steady step time and the first loss."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # before jax makes its thread pools
    import jax

    sys.path.insert(0, str(REPO / "tools"))
    from device_common import local_target, time_step

    from gpfm_jax.plan import compile as compile_lib
    from gpfm_jax.plan.cli import load_config
    from gpfm_jax.train.config_schema import parse

    cfg = parse(load_config(Path(config)))
    devices = jax.devices()[:1]
    built = compile_lib.build(cfg, local_target(devices), standin_teachers=True, devices=devices)
    compiled = compile_lib.compile_built(built)
    state, batch, experts = compile_lib.materialize(built)
    state, first = compiled.compiled(state, batch, experts)  # the state is donated: the next calls take the new one
    step_s, _, _ = time_step(compiled.compiled, (state, batch, experts), 1, iters)
    return {"trace_s": compiled.trace_s, "compile_s": compiled.compile_s, "step_s": step_s,
            "first_loss": float(first["loss/total"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.py"))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.config, args.iters)))
        return 0
    print(f"config {args.config}, one CPU core, one device; seconds")
    print(f"{'flags':32s} {'trace':>6s} {'compile':>8s} {'step':>7s}  first loss")
    for name, flags in FLAG_SETS.items():
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {flags}".strip())
        out = subprocess.run([sys.executable, __file__, "--child", "--config", args.config, "--iters", str(args.iters)],
                             env=env, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:32s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:32s} {r['trace_s']:6.1f} {r['compile_s']:8.1f} {r['step_s']:7.3f}  {r['first_loss']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
