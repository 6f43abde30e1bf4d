"""`gpfm-plan --search`: the cheapest remat policy that fits the requested batch, and the largest batch it allows.

Policies are ranked by the matmul FLOPs they execute (traced, not compiled; ties keep the order below: saving more
is cheaper in elementwise recomputation) and compiled at the requested batch in that order until one fits (a TPU
program that does not fit is refused early in the compile). Peak memory is close to affine in the per-device batch
(state and code are fixed, activations scale), so one more compile at half the batch gives the slope, the largest
batch that fits is predicted and then confirmed by compiling it (stepping down 5% until it fits). When no policy
fits the batch, the largest batch is searched for the policy that keeps the least ("full").

`accumulation()` answers "how do I run the config's global batch on this slice": the fewest microbatches
(`config.step.microbatches`, exact gradient accumulation) whose chunk fits, in the cheapest tier of policies that
gets there (a tier: policies within ACCUMULATION_SAVING of each other's FLOPs, e.g. none / dots_saveable on TPU,
equal FLOPs). Peak memory is again close to affine in the chunk size (the state and the gradient accumulator are
fixed), so 1 and 2 microbatches give the line, the predicted count is compiled to confirm (more microbatches while
it does not fit). Microbatches change no FLOPs, so the roofline's images/s is that of the policy; fewer, larger
chunks keep the matmuls large (better real MFU), which is why within a tier the fewest microbatches win (ties: the
cheaper policy), and not the policy that saves most.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


from gpfm_jax.plan import analysis
from gpfm_jax.plan.targets import Target
from gpfm_jax.train.config_schema import TrainConfig, replace_fields

# cheapest first at equal FLOPs: "none" saves everything, "dots_and_attention_saveable" every matmul and the
# attention output, "full" only the block inputs
POLICIES = ("none", "dots_and_attention_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")


@dataclasses.dataclass
class PolicyResult:
    remat: str
    flops_per_step: float  # at the requested batch (traced)
    peak_at_batch: int
    fits_at_batch: bool
    max_batch: int  # largest per-device batch confirmed to fit (0: not searched / none)
    points: list[dict[str, Any]]  # (batch, peak, fits) compiled


@dataclasses.dataclass
class SearchResult:
    target: str
    per_device_batch: int
    chosen: str | None  # cheapest policy that fits the requested batch
    max_batch: int  # confirmed largest per-device batch for the chosen policy (or "full" when none fits)
    policies: list[PolicyResult]
    plan: analysis.PlanResult | None  # the full plan of the chosen point

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# A policy that fits only with microbatches is worth them when it executes at least this much less than the policy
# that fits the whole batch (e.g. v5p-8 at 192/chip: only "full" fits, +19% FLOPs; "dots_saveable" in 2
# microbatches). Smaller differences (dots_saveable vs none: +0.5% on H100) do not pay for the smaller matmuls.
ACCUMULATION_SAVING = 0.05


def worth_accumulating(result: SearchResult, saving: float = ACCUMULATION_SAVING) -> tuple[str, ...]:
    """The policies, cheapest first, that did not fit the batch but execute at least `saving` fewer FLOPs than the
    chosen one (all the policies that did not fit when none was chosen): candidates for `accumulation()`."""
    chosen = next((p for p in result.policies if p.remat == result.chosen), None)
    bound = math.inf if chosen is None else chosen.flops_per_step * (1 - saving)
    return tuple(p.remat for p in sorted(result.policies, key=lambda p: p.flops_per_step)
                 if not p.fits_at_batch and p.flops_per_step <= bound)


def _tiers(order: list[str], flops: dict[str, float], saving: float = ACCUMULATION_SAVING) -> list[list[str]]:
    """Policies (cheapest first) grouped so that each group's FLOPs are within `saving` of its cheapest."""
    tiers: list[list[str]] = []
    for p in order:
        if tiers and flops[p] <= flops[tiers[-1][0]] * (1 + saving):
            tiers[-1].append(p)
        else:
            tiers.append([p])
    return tiers


def _affine_max(b1: int, p1: int, b2: int, p2: int, limit: int) -> int:
    if b1 == b2 or p1 == p2:
        return b1 if p1 <= limit else 0
    slope = (p2 - p1) / (b2 - b1)
    if slope <= 0:
        return max(b1, b2)
    return max(0, math.floor(b1 + (limit - p1) / slope))


def search(cfg: TrainConfig, target: Target, per_device_batch: int, policies=POLICIES,
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
        r = point(per_device_batch, remat)
        results.append(PolicyResult(remat, flops[remat], r.memory.peak, r.memory.fits, 0,
                                    [dict(batch=per_device_batch, peak=r.memory.peak, fits=r.memory.fits)]))
        if r.memory.fits:
            chosen, chosen_plan = remat, r
            break  # the more expensive policies are not needed
    # the largest batch: for the chosen policy, or (nothing fits) for the one that saves the most memory
    policy = results[-1]
    half_batch = max(1, per_device_batch // 2)
    half = point(half_batch, policy.remat) if half_batch != per_device_batch else None
    confirmed = 0
    if half is not None and not half.error and half.memory.peak > 0 and policy.peak_at_batch > 0:
        policy.points.insert(0, dict(batch=half_batch, peak=half.memory.peak, fits=half.memory.fits))
        candidate = _affine_max(half_batch, half.memory.peak, per_device_batch, policy.peak_at_batch,
                                half.memory.limit)
        floor = per_device_batch if policy.fits_at_batch else (half_batch if half.memory.fits else 0)
        for _ in range(4):
            if candidate <= floor:
                break
            r = point(candidate, policy.remat)
            policy.points.append(dict(batch=candidate, peak=r.memory.peak, fits=r.memory.fits))
            if r.memory.fits:
                confirmed = candidate
                break
            candidate = max(floor, int(candidate * 0.95))
        confirmed = confirmed or floor
    elif policy.fits_at_batch:
        confirmed = per_device_batch
    policy.max_batch = confirmed
    return SearchResult(target.name, per_device_batch, chosen, confirmed, results, chosen_plan)



@dataclasses.dataclass
class AccumulationResult:
    target: str
    global_batch: int
    per_device_batch: int
    remat: str | None  # the cheapest policy that runs the batch with some microbatch count (None: none does)
    microbatches: int  # 0: nothing fits
    peak: int
    img_per_s_per_chip: float
    points: list[dict[str, Any]]  # (remat, microbatches, peak, fits) compiled
    command: str  # the gpfm-train overrides that run it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def accumulation(cfg: TrainConfig, target: Target, policies=POLICIES, standin_teachers: bool = False,
                 mfu: float = analysis.DEFAULT_MFU, samples: float = analysis.RELEASED_SAMPLES,
                 margin: float = analysis.DEFAULT_MARGIN, devices: list | None = None,
                 log: Callable[[str], None] = lambda s: None) -> AccumulationResult:
    """The fewest microbatches that run `cfg.data.global_batch_size` on the target, for the cheapest remat policy
    that gets there (module docstring)."""
    from gpfm_jax.plan import targets as targets_lib

    devices = targets_lib.devices(target) if devices is None else devices
    per_device = cfg.data.global_batch_size // target.chips
    counts = [k for k in range(1, per_device + 1) if per_device % k == 0]
    flops = {p: analysis.traced_flops(cfg, target, per_device, p, standin_teachers, devices) for p in policies}
    order = sorted(policies, key=lambda p: (round(flops[p] / 1e9), policies.index(p)))
    points: list[dict[str, Any]] = []

    def point(remat: str, k: int) -> analysis.PlanResult:
        # masks drawn per device chunk (one data shard each, as the reference's per-GPU collate): a microbatch's
        # masked-token buffer is then its share of the batch's (with one shard per host any chunk may hold every
        # masked crop, and no microbatch count shrinks it), and each device gathers its own masked tokens
        changes: dict[str, Any] = {"step.microbatches": k}
        if not cfg.data.shards:
            changes["data.shards"] = target.chips * k
        c = replace_fields(cfg, changes)
        r = analysis.plan_point(c, target, per_device, remat, standin_teachers, mfu, samples, margin, devices)
        points.append(dict(remat=remat, microbatches=k, peak=r.memory.peak, fits=r.memory.fits, error=r.error))
        log(f"  {remat:<34} {k:>3} microbatch(es) of {per_device // k:>4}/device: peak "
            f"{r.memory.peak / 2**30:7.2f} GiB {'fits' if r.memory.fits else 'does not fit'}"
            + (f" ({r.error})" if r.error else ""))
        return r

    def fewest(remat: str, most: int) -> analysis.PlanResult | None:
        """The fewest microbatches (at most `most`) whose chunk fits with this policy, or None."""
        allowed = [k for k in counts if k <= most]
        one = point(remat, allowed[0])
        if one.memory.fits or len(allowed) == 1:
            return one if one.memory.fits else None
        two = point(remat, allowed[1])
        if two.memory.fits:
            return two
        if one.memory.peak <= 0 or two.memory.peak <= 0:
            return None
        largest = _affine_max(per_device // allowed[1], two.memory.peak, per_device, one.memory.peak,
                              two.memory.limit)
        for k in [k for k in allowed[2:] if per_device // k <= max(largest, 1)][:3]:  # predicted, then 2 more
            r = point(remat, k)
            if r.memory.fits:
                return r
        return None

    for tier in _tiers(order, flops):
        # within a tier FLOPs differ by under ACCUMULATION_SAVING, so fewer (larger) microbatches win; the most
        # memory-frugal policy goes first and its count bounds the search of the others
        best: tuple[str, analysis.PlanResult] | None = None
        for remat in reversed(tier):
            most = per_device if best is None else (best[1].microbatches if flops[remat] < flops[best[0]]
                                                     else best[1].microbatches - 1)
            found = fewest(remat, most) if most >= 1 else None
            if found is not None:
                best = (remat, found)
        if best is not None:
            remat, found = best
            k = found.microbatches
            command = (f"--config.step.microbatches={k} --config.compute.remat_policy={remat}"
                       + ("" if cfg.data.shards else f" --config.data.shards={target.chips * k}")
                       + ("" if cfg.mesh.fsdp == found.mesh.get("fsdp", 1) else
                          f" --config.mesh.fsdp={found.mesh.get('fsdp', 1)}"))
            return AccumulationResult(target.name, cfg.data.global_batch_size, per_device, remat, k,
                                      found.memory.peak, found.roofline.img_per_s_per_chip if found.roofline else 0.0,
                                      points, command)
    return AccumulationResult(target.name, cfg.data.global_batch_size, per_device, None, 0, 0, 0.0, points, "")
