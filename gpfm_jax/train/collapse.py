"""Collapse detection during a run: reads each iteration's metrics (host side, in order) and says when
self-distillation has collapsed, which kind, since when, the numbers that show it, and what to change.

Why: a collapsed DINO head is invisible in the total loss (KoLeo, iBOT and distillation keep falling) and in the
end-of-run probe; it shows in the teacher's targets and features (step/signals.py). The kinds:

  uniform         teacher target ~uniform for every image (entropy ~ln K) and the DINO loss ~ln K
  one_hot         every image on the same few prototypes (per-sample and batch-mean entropy both ~0)
  representation  the teacher's CLS features of different images nearly identical (spread ~0)
  distill_only    over the last `collapse_window` iterations neither DINO nor iBOT fell (by 1%) while the
                  distillation terms fell (by 10%)

A kind is reported when its predicate held for `collapse_window` consecutive iterations, counting only iterations
>= `collapse_after` (a fresh network is legitimately one-hot / unspread for a while: LayerScale 1e-5 gives every image
almost the same CLS, a sharp teacher turns that into one shared one-hot target). Each kind is reported once per run
(process lifetime). The thresholds and their calibration are in docs/training.md ("Collapse detection").
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Mapping

ON_COLLAPSE = ("warn", "stop", "off")
KINDS = ("uniform", "one_hot", "representation", "distill_only")

# Thresholds (fractions of ln K, of the feature spread's maximum 1, relative changes). Calibrated on the runs in
# docs/training.md's table; chosen far from both the collapsed and the healthy values seen there.
UNIFORM_ENTROPY = 0.97  # teacher per-sample entropy / ln K at or above
UNIFORM_DINO = 0.95  # and the DINO loss / ln K at or above (a uniform target makes it >= ln K)
ONE_HOT_ENTROPY = 0.1  # per-sample entropy / ln K at or below ...
ONE_HOT_BATCH = 0.1  # ... and the batch-mean target's entropy / ln K at or below
REPRESENTATION_SPREAD = 0.02  # sqrt(D) x std of the normalised teacher CLS across the batch, at or below
FLAT = 0.01  # DINO (in ln K) and iBOT (relative) fell by less than this over the window (first vs last quarter)
DISTILL_FALL = 0.10  # while the distillation terms' sum fell by more than this (relative) over the window

ADVICE = {
    "uniform": (
        "centring wins over sharpening. Lower the teacher temperature (schedule.teacher_temp, e.g. 0.04 or less; "
        "the demo needed 0.01) and/or lengthen its warm-up (schedule.teacher_temp_warmup_steps); a larger batch "
        "(data.global_batch_size) or a slower centre (loss.center_momentum closer to 1) may also help. Likely, not "
        "certain: short runs of tiny models also sit here early and some recover."),
    "one_hot": (
        "sharpening wins over centring. Raise the teacher temperature (schedule.teacher_temp / teacher_temp_start), "
        "make sure centring is on (loss.centering) with a faster centre (lower loss.center_momentum), or lower the "
        "learning rate (schedule.base_lr). Fewer prototypes (model.heads.out_dim) is a last resort."),
    "representation": (
        "the backbone maps every image to almost the same feature. Lower the learning rate (schedule.base_lr) or "
        "lengthen its warm-up (schedule.warmup_steps), check the KoLeo weight (loss.koleo_weight) and the data "
        "(identical or blank tiles look like this too)."),
    "distill_only": (
        "the self-distillation terms are not learning; the expert distillation carries the run. Check the DINO/iBOT "
        "kinds above (a collapsed head stops them), the teacher temperature and its warm-up, the learning rate and "
        "the DINO/iBOT loss weights. Can be benign late in a run whose DINO/iBOT have converged."),
}


@dataclasses.dataclass(frozen=True)
class CollapseSettings:
    """The detector's knobs (config.sanity: on_collapse, collapse_window, collapse_after)."""

    window: int = 50
    after: int = 150


def _distill_sum(m: Mapping[str, float]) -> float | None:
    vals = [v for k, v in m.items() if k.startswith("loss/distill")]
    return sum(vals) if vals else None


class CollapseDetector:
    """`update(iteration, metrics) -> [verdict, ...]` (new verdicts only). A verdict is a dict: kind, since (the first
    iteration of the streak), iteration (when reported), the numbers, a message and the advice."""

    def __init__(self, num_prototypes: int, settings: CollapseSettings = CollapseSettings()):
        if num_prototypes < 2:
            raise ValueError(f"num_prototypes={num_prototypes}: expected >= 2")
        if settings.window < 1:
            raise ValueError(f"collapse_window={settings.window}: expected >= 1")
        self.ln_k = math.log(num_prototypes)
        self.k = num_prototypes
        self.settings = settings
        self.since: dict[str, int | None] = {kind: None for kind in KINDS}
        self.reported: dict[str, dict[str, Any]] = {}
        self.history: collections.deque = collections.deque(maxlen=settings.window)

    def numbers(self, m: Mapping[str, float]) -> dict[str, float]:
        """The per-iteration quantities the predicates read (NaN where a metric is absent)."""
        get = lambda key: float(m.get(key, math.nan))  # noqa: E731
        return {
            "dino_over_lnk": get("loss/dino") / self.ln_k,
            "ibot": get("loss/ibot"),
            "distill": _distill_sum(m) if _distill_sum(m) is not None else math.nan,
            "teacher_entropy": get("collapse/teacher_entropy"),
            "batch_entropy": get("collapse/batch_entropy"),
            "prototypes_used": get("collapse/prototypes_used"),
            "cls_spread": get("collapse/cls_spread"),
        }

    def predicates(self, n: Mapping[str, float]) -> dict[str, bool]:
        """Which kinds this iteration's numbers (and the window's history, for distill_only) show."""
        out = {
            "uniform": n["teacher_entropy"] >= UNIFORM_ENTROPY and n["dino_over_lnk"] >= UNIFORM_DINO,
            "one_hot": n["teacher_entropy"] <= ONE_HOT_ENTROPY and n["batch_entropy"] <= ONE_HOT_BATCH,
            "representation": n["cls_spread"] <= REPRESENTATION_SPREAD,
            "distill_only": False,
        }
        h = self.history
        if len(h) == h.maxlen and h.maxlen >= 4:
            q = max(1, len(h) // 4)
            first = {key: sum(r[key] for r in list(h)[:q]) / q for key in ("dino_over_lnk", "ibot", "distill")}
            last = {key: sum(r[key] for r in list(h)[-q:]) / q for key in ("dino_over_lnk", "ibot", "distill")}
            # "not learning" = not falling: a DINO loss that rises is not counted as learning here, although a run
            # that starts one-hot (the shipped demo) legitimately climbs; its iBOT falls meanwhile
            dino_stuck = first["dino_over_lnk"] - last["dino_over_lnk"] < FLAT
            ibot_stuck = first["ibot"] - last["ibot"] < FLAT * abs(first["ibot"])
            distill_falls = first["distill"] - last["distill"] > DISTILL_FALL * abs(first["distill"])
            out["distill_only"] = bool(dino_stuck and ibot_stuck and distill_falls)
        return out

    def update(self, iteration: int, metrics: Mapping[str, float]) -> list[dict[str, Any]]:
        n = self.numbers(metrics)
        self.history.append(n)
        fresh = []
        if iteration < self.settings.after:
            return fresh
        for kind, holds in self.predicates(n).items():
            if not holds:
                self.since[kind] = None
                continue
            if self.since[kind] is None:
                self.since[kind] = iteration
            if kind not in self.reported and iteration - self.since[kind] + 1 >= self.settings.window:
                verdict = self._verdict(kind, self.since[kind], iteration, n)
                self.reported[kind] = verdict
                fresh.append(verdict)
        return fresh

    def _verdict(self, kind: str, since: int, iteration: int, n: Mapping[str, float]) -> dict[str, Any]:
        shown = {
            "uniform": f"teacher entropy {n['teacher_entropy']:.3f} ln K, DINO loss {n['dino_over_lnk']:.3f} ln K "
                       f"(K = {self.k})",
            "one_hot": f"teacher entropy {n['teacher_entropy']:.3f} ln K, batch-mean target entropy "
                       f"{n['batch_entropy']:.3f} ln K, {n['prototypes_used']:.1f} of {self.k} prototypes in use",
            "representation": f"teacher CLS spread {n['cls_spread']:.4f} (1 = spread over the sphere, 0 = identical)",
            "distill_only": f"over the last {self.settings.window} iterations: DINO {n['dino_over_lnk']:.3f} ln K "
                            f"and iBOT {n['ibot']:.3f} did not fall (by {FLAT:.0%}) while distillation fell > "
                            f"{DISTILL_FALL:.0%} (now {n['distill']:.4f})",
        }[kind]
        name = {"uniform": "uniform collapse", "one_hot": "one-hot collapse",
                "representation": "representation collapse", "distill_only": "only distillation is learning"}[kind]
        message = (f"collapse: {name} since iteration {since} (held {iteration - since + 1} iterations): {shown}. "
                   f"Advice: {ADVICE[kind]}")
        numbers = {key: (None if math.isnan(v) else v) for key, v in n.items()}
        return {"kind": kind, "since": since, "iteration": iteration, "numbers": numbers, "message": message}


def detector_for(cfg: Any) -> CollapseDetector | None:
    """The run's detector from its TrainConfig (None with config.sanity.on_collapse = "off"). Every process of a
    multi-process run reads the same (replicated) metrics in the same order, so all decide alike, at the same
    iteration, and a "stop" is taken together."""
    s = cfg.sanity
    if s.on_collapse == "off":
        return None
    return CollapseDetector(cfg.model.heads.out_dim, CollapseSettings(window=s.collapse_window,
                                                                      after=s.collapse_after))


def verdict_row(verdict: Mapping[str, Any], on_collapse: str) -> dict[str, Any]:
    """The metrics.jsonl row of kind "collapse" (JSON-ready): the verdict and what the run does about it."""
    return {"collapse_kind": verdict["kind"], "since": verdict["since"], "numbers": verdict["numbers"],
            "message": verdict["message"], "action": on_collapse}


def replay(rows: Mapping[int, Mapping[str, float]], num_prototypes: int,
           settings: CollapseSettings = CollapseSettings()) -> list[dict[str, Any]]:
    """The verdicts a run's logged metrics (`metrics_writer.read_metrics(workdir)`) give with `settings`: how the
    thresholds were calibrated on finished runs (docs/training.md) without rerunning them."""
    detector = CollapseDetector(num_prototypes, settings)
    return [v for i in sorted(rows) for v in detector.update(i, rows[i])]
