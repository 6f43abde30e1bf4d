"""Collapse-detection calibration runs (docs/training.md, "Collapse detection"): short gpfm-train runs of the tiny
test config (tests/helpers_train.py) with the change that causes each kind, and the signals and verdicts they log.

    python tools/collapse_calibration.py STEPS NAME [NAME ...]      # e.g. 24 uniform one_hot frozen

Each run is loop.train in this process (window 4 from iteration 8, as tests/test_collapse_run.py); replay a log with
other settings through `gpfm_jax.train.collapse.replay(read_metrics(workdir), K, CollapseSettings(window, after))`.
Workdirs: $COLLAPSE_CAL_DIR (default /tmp/collapse_cal)/tiny_NAME.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

VARIANTS = {
    "base": {},  # the recipe's temperature shape, 0.04 -> 0.07 over 4 iterations
    "uniform": {"schedule.teacher_temp_start": 1.0, "schedule.teacher_temp": 1.0},
    "one_hot": {"schedule.teacher_temp_start": 1e-3, "schedule.teacher_temp": 1e-3, "loss.center_momentum": 1.0},
    "frozen": {"schedule.base_lr": 0.0, "model.vit.layerscale_init": 1e-5},
    "lr1": {"schedule.base_lr": 1.0},
    "distill": {"loss.dino_weight": 1e-6, "loss.ibot_weight": 1e-6},
    "t01": {"schedule.teacher_temp_start": 0.01, "schedule.teacher_temp": 0.01},
    "t04": {"schedule.teacher_temp_start": 0.04, "schedule.teacher_temp": 0.04},
}


def main(argv: list[str]) -> None:
    import jax

    from helpers_train import tiny
    from gpfm_jax.train import loop
    from gpfm_jax.train.metrics_writer import read_metrics

    root = Path(os.environ.get("COLLAPSE_CAL_DIR", "/tmp/collapse_cal"))
    jax.config.update("jax_compilation_cache_dir", str(root / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    steps, names = int(argv[0]), argv[1:]
    for name in names:
        workdir = root / f"tiny_{name}"
        shutil.rmtree(workdir, ignore_errors=True)
        t = time.time()
        cfg = tiny(one_device=True, **{"steps": steps, "checkpoint.every": 1000, "sanity.collapse_window": 4,
                                       "sanity.collapse_after": 8, **VARIANTS[name]})
        result = loop.train(cfg, workdir)
        print(f"{name}: {result.status} in {time.time() - t:.1f} s", flush=True)
        rows, ln_k = read_metrics(workdir), math.log(cfg.model.heads.out_dim)
        for i in sorted(rows)[::2]:
            r = rows[i]
            distill = sum(v for k, v in r.items() if k.startswith("loss/distill"))
            signals = {k[len("collapse/"):]: round(v, 3) for k, v in r.items() if k.startswith("collapse/")}
            print(f"  {i} dino/lnK {r['loss/dino'] / ln_k:.3f} ibot {r['loss/ibot']:.3f} distill {distill:.3f}",
                  signals)
        for line in (workdir / "metrics.jsonl").read_text().splitlines():
            if '"kind": "collapse"' in line:
                print("  VERDICT", json.loads(line)["message"])


if __name__ == "__main__":
    main(sys.argv[1:])
