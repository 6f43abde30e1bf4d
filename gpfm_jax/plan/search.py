"""`gpfm-plan --search`: the cheapest remat policy that fits the requested batch, and the largest batch it allows.

Policies are ranked by the matmul FLOPs they execute (traced, not compiled; ties keep the order below: saving more
is cheaper in elementwise recomputation). Peak memory is close to affine in the per-device batch (state and code
are fixed, activations scale), so two compiles per policy (the batch and half of it) give its slope and the
largest batch that fits is predicted, then confirmed by compiling it (stepping down until it fits).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from gpfm_jax.plan import analysis
from gpfm_jax.plan.targets import Target

# cheapest first at equal FLOPs: "none" saves everything, "full" saves only the block inputs
POLICIES = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")


@dataclasses.dataclass
class PolicyResult:
    remat: str
    flops_per_step: float  # at the requested batch (traced)
    peak_at_batch: int
    fits_at_batch: bool
    max_batch: int  # largest per-device batch predicted to fit (0: none)
    points: list[dict[str, Any]]  # (batch, peak, fits) compiled


@dataclasses.dataclass
class SearchResult:
    target: str
    per_device_batch: int
    chosen: str | None  # cheapest policy that fits the requested batch
    max_batch: int  # confirmed largest per-device batch for the chosen policy
    policies: list[PolicyResult]
    plan: analysis.PlanResult | None  # the full plan of the chosen point

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _affine_max(b1: int, p1: int, b2: int, p2: int, limit: int) -> int:
    if b1 == b2 or p1 == p2:
        return b1 if p1 <= limit else 0
    slope = (p2 - p1) / (b2 - b1)
    if slope <= 0:
        return max(b1, b2)
    return max(0, math.floor(b1 + (limit - p1) / slope))


def search(cfg: ml_collections.ConfigDict, target: Target, per_device_batch: int, policies=POLICIES,
           standin_teachers: bool = False, mfu: float = analysis.DEFAULT_MFU,
           samples: float = analysis.RELEASED_SAMPLES, margin: float = analysis.DEFAULT_MARGIN,
           devices: list | None = None, log: Callable[[str], None] = lambda s: None) -> SearchResult:
    from gpfm_jax.plan import targets as targets_lib

    devices = targets_lib.devices(target) if devices is None else devices
    flops = {p: analysis.traced_flops(cfg, target, per_device_batch, p, standin_teachers, devices) for p in policies}
    order = sorted(policies, key=lambda p: (round(flops[p] / 1e9), policies.index(p)))
    log("policies by executed matmul FLOPs: " + ", ".join(f"{p} {flops[p]:.4g}" for p in order))

    def point(batch: int, remat: str) -> analysis.PlanResult:
        r = analysis.plan_point(cfg, target, batch, remat, standin_teachers, mfu, samples, margin, devices)
        log(f"  {remat:<34} batch {batch:>4}: peak {r.memory.peak / 2**30:7.2f} GiB "
            f"{'fits' if r.memory.fits else 'does not fit'}{' (' + r.error + ')' if r.error else ''}")
        return r

    results, chosen, chosen_plan = [], None, None
    for remat in order:
        full = point(per_device_batch, remat)
        half_batch = max(1, per_device_batch // 2)
        half = point(half_batch, remat) if half_batch != per_device_batch else full
        limit = full.memory.limit
        usable = not full.error and not half.error and full.memory.peak > 0 and half.memory.peak > 0
        max_batch = _affine_max(half_batch, half.memory.peak, per_device_batch, full.memory.peak, limit) if usable else 0
        results.append(PolicyResult(remat, flops[remat], full.memory.peak, full.memory.fits, max_batch,
                                     [dict(batch=b, peak=r.memory.peak, fits=r.memory.fits)
                                      for b, r in ((half_batch, half), (per_device_batch, full))]))
        if full.memory.fits and chosen is None:
            chosen, chosen_plan = remat, full
            break  # more expensive policies are not needed
    confirmed = 0
    if chosen is not None:
        candidate = results[-1].max_batch
        for _ in range(4):
            if candidate <= per_device_batch:
                confirmed = per_device_batch
                break
            r = point(candidate, chosen)
            results[-1].points.append(dict(batch=candidate, peak=r.memory.peak, fits=r.memory.fits))
            if r.memory.fits:
                confirmed = candidate
                break
            candidate = max(per_device_batch, int(candidate * 0.95))
        else:
            confirmed = per_device_batch
    return SearchResult(target.name, per_device_batch, chosen, confirmed, results, chosen_plan)

