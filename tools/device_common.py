"""What tools/device_check.py's section modules share (issue 27): the JSON report with per-section time budgets,
the local device as a planner target, the step's typed config, a median timer."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class Skip(Exception):
    """A section that cannot run here (a missing package, no time left): recorded as skipped, not failed."""


class Report:
    """The JSON document, rewritten (temp file + rename) after every section. With a deadline (seconds from the
    report's creation) a section whose budget exceeds the time left is skipped, so the call that runs the command
    ends with everything measured so far written; every section's budget is printed before it starts."""

    def __init__(self, path: Path, deadline_s: float | None = None):
        self.path, self.deadline_s, self.t0 = path, deadline_s, time.perf_counter()
        self.data: dict[str, Any] = {"sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float | None:
        return None if not self.deadline_s else self.deadline_s - (time.perf_counter() - self.t0)

    def section(self, name: str, fn: Callable[[], dict[str, Any]], budget_s: float | None = None) -> None:
        start, left = time.perf_counter(), self.left_s()
        print(f"[device_check] {name}: budget {budget_s or '-'} s"
              + ("" if left is None else f", {left:.0f} s left before the deadline"), flush=True)
        try:
            if left is not None and budget_s and budget_s > left:
                raise Skip(f"its budget ({budget_s} s) exceeds the {left:.0f} s left before --deadline-s")
            result = {"ok": True, **fn()}
        except Skip as why:
            result = {"ok": None, "skipped": str(why)}
        except Exception as err:  # noqa: BLE001 - record and carry on with the next section
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["budget_s"] = budget_s
        self.data["sections"][name] = result
        self.write()
        print(f"[device_check] {name}: {json.dumps(brief(result))}", flush=True)

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default) + "\n")
        os.replace(tmp, self.path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "traceback" and not isinstance(v, (dict, list))}


def peak(device) -> float | None:
    from gpfm_jax.plan.targets import peak_bf16_for

    return peak_bf16_for(device.device_kind)


def local_target(devices: list):
    """This host's devices as a gpfm-plan target (HBM from memory_stats; the CPU's stand-in figures off a GPU)."""
    from gpfm_jax.plan.targets import TARGETS, Target

    d = devices[0]
    stats = d.memory_stats() or {}
    return Target(name=f"local-{len(devices)}x-{d.device_kind}", platform=d.platform, chips=len(devices), hosts=1,
                  hbm_bytes=int(stats.get("bytes_limit") or TARGETS["cpu-8"].hbm_bytes),
                  peak_bf16_flops=peak(d) or TARGETS["cpu-8"].peak_bf16_flops, link_bytes_per_s=450e9,
                  island_size=len(devices))


def step_config(tiny: bool, num_devices: int, changes: dict[str, Any] | None = None):
    """The typed config of the step to time: the official recipe (FSDP over 8, or what this host has), or with
    --tiny the demo shrunk further (one block, narrow heads, two local crops); `changes`: dotted fields replaced."""
    from gpfm_jax.plan.cli import load_config
    from gpfm_jax.train.config_schema import parse, replace_fields

    cfg = load_config(REPO / "configs" / ("demo.py" if tiny else "gpfm_vitl14.py"))
    if tiny:
        cfg.model.vit.update(dict(depth=1, embed_dim=32, num_heads=2))
        cfg.model.heads.update(dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, distill_bottleneck_dim=16))
        cfg.standin.update(dict(embed_dim=16, depth=1, num_heads=2, pooler_dim=16))
        cfg.data.multicrop.num_local_crops = 2
    cfg.mesh.fsdp = math.gcd(int(cfg.mesh.fsdp), num_devices)
    return replace_fields(parse(cfg), changes or {})


def time_step(compiled: Callable, inputs: tuple, warmup: int, iters: int) -> tuple[float, Any, tuple]:
    """Seconds per call of a compiled train step that donates its state: `warmup` calls, then the mean of `iters`
    (>= 1). Returns (step_s, the last step's metrics, the latest (state, batch, experts) to hand on)."""
    import jax

    state, data, experts = inputs
    for _ in range(warmup):
        state, metrics = compiled(state, data, experts)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(iters):
        state, metrics = compiled(state, data, experts)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t0) / iters, metrics, (state, data, experts)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
