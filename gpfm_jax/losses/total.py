"""Loss weights of the GPFM objective and the weighted sum of its terms.

Term names (also the metric names): "dino", "ibot", "koleo", "distill/<teacher>/cls", "distill/<teacher>/patch".
`total = sum_name weight[name] * term[name]`; a term without a weight is an error rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from gpfm_jax.losses.distill import cosine_loss, patch_distill_loss


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Every number of SPEC's Losses section; defaults = GPFM ViT-L."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: str = "centering"  # or "sinkhorn_knopp"
    sinkhorn_iterations: int = 3
    koleo_eps: float = 1e-8
    koleo_pairwise_eps: bool = True  # torch PairwiseDistance: ||x - y + eps|| (DINOv2); False: ||x - y||
    # per teacher: weight of the CLS term and of the patch term (absent = no patch term)
    distill_cls_weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"uni": 1.0, "phikon": 0.5, "conch": 1.0})
    distill_patch_weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"uni": 0.25, "phikon": 0.125})
    patch_cos_weight: float = 0.9
    patch_smooth_l1_weight: float = 0.1
    smooth_l1_beta: float = 1.0

    def __post_init__(self):
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")
        extra = sorted(set(self.distill_patch_weights) - set(self.distill_cls_weights))
        if extra:
            raise ValueError(f"patch weights for teachers without a CLS weight: {extra}")


def loss_weights(cfg: LossConfig) -> dict[str, float]:
    """Name -> weight of every term the config turns on (weight > 0)."""
    weights = {"dino": cfg.dino_weight, "ibot": cfg.ibot_weight, "koleo": cfg.koleo_weight}
    for t, w in cfg.distill_cls_weights.items():
        weights[f"distill/{t}/cls"] = w
    for t, w in cfg.distill_patch_weights.items():
        weights[f"distill/{t}/patch"] = w
    return {k: float(w) for k, w in weights.items() if w > 0}


def distill_terms(
    cls_preds: Mapping[str, jax.Array],
    cls_targets: Mapping[str, jax.Array],
    patch_preds: Mapping[str, jax.Array],
    patch_targets: Mapping[str, jax.Array],
    cfg: LossConfig,
) -> dict[str, jax.Array]:
    """Unweighted distillation terms. cls_* [B, D_t]; patch_* [B, N, D_t] already on the student grid.

    Only teachers with a positive weight in `cfg` are computed; a needed prediction or target missing is a KeyError.
    """
    terms = {}
    for t, w in cfg.distill_cls_weights.items():
        if w > 0:
            terms[f"distill/{t}/cls"] = cosine_loss(cls_preds[t], cls_targets[t])
    for t, w in cfg.distill_patch_weights.items():
        if w > 0:
            terms[f"distill/{t}/patch"] = patch_distill_loss(
                patch_preds[t], patch_targets[t], cfg.patch_cos_weight, cfg.patch_smooth_l1_weight, cfg.smooth_l1_beta)
    return terms


def weighted_total(
    terms: Mapping[str, jax.Array], weights: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum_name weights[name] * terms[name], metrics) with metrics = unweighted terms + "total"."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f"no weight for loss terms {missing}")
    total = jnp.zeros((), jnp.float32)
    for name, value in terms.items():
        total = total + weights[name] * value.astype(jnp.float32)
    metrics = {f"loss/{name}": value for name, value in terms.items()}
    metrics["loss/total"] = total
    return total, metrics
