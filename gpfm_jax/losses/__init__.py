"""GPFM objective as pure functions: teacher targets, DINO, iBOT, KoLeo, expert distillation, weighted total."""

from gpfm_jax.losses.centering import (
    batch_mean,
    centered_softmax,
    group_mean_weights,
    init_center,
    sinkhorn_knopp,
    teacher_targets,
    update_center,
)
from gpfm_jax.losses.dino import dino_loss, pair_cross_entropy, split_views
from gpfm_jax.losses.distill import (
    cosine_loss,
    cosine_similarity,
    patch_distill_loss,
    smooth_l1,
)
from gpfm_jax.losses.ibot import ibot_loss, ibot_loss_dense, masked_patch_weights, select_masked
from gpfm_jax.losses.koleo import koleo_global_views, koleo_loss
from gpfm_jax.losses.total import LossConfig, distill_terms, loss_weights, weighted_total

__all__ = [
    "LossConfig",
    "batch_mean",
    "centered_softmax",
    "cosine_loss",
    "cosine_similarity",
    "dino_loss",
    "group_mean_weights",
    "distill_terms",
    "ibot_loss",
    "ibot_loss_dense",
    "init_center",
    "koleo_global_views",
    "koleo_loss",
    "loss_weights",
    "masked_patch_weights",
    "pair_cross_entropy",
    "patch_distill_loss",
    "select_masked",
    "sinkhorn_knopp",
    "smooth_l1",
    "split_views",
    "teacher_targets",
    "update_center",
    "weighted_total",
]
