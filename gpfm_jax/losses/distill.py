"""Expert distillation losses (GPFM `Cosine` and `FeatureLoss`).

CLS term:   1 - mean_b cos(head_t(student CLS)_b, target_b)
patch term: alpha * (1 - mean cos) + beta * SmoothL1(beta_l1)  with alpha 0.9, beta 0.1; cos per token, means over
            all (image, token) pairs; SmoothL1 is torch's default mean over every element, on raw (unnormalised)
            head outputs and targets.
The teacher patch grid (14x14) is brought to the student grid (16x16) first, by `teachers.teacher_targets`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """torch F.cosine_similarity over the last axis: a.b / (max(||a||, eps) * max(||b||, eps))."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def cosine_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """1 - mean cos over all leading positions."""
    return 1.0 - jnp.mean(cosine_similarity(pred, target))


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float = 1.0) -> jax.Array:
    """torch SmoothL1Loss(beta), reduction mean: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta."""
    d = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta))


def patch_distill_loss(
    pred: jax.Array,
    target: jax.Array,
    cos_weight: float = 0.9,
    smooth_l1_weight: float = 0.1,
    smooth_l1_beta: float = 1.0,
) -> jax.Array:
    """pred/target [B, N, D] on the same grid -> 0.9 (1 - mean cos) + 0.1 SmoothL1."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must match; upsample the teacher grid first")
    return cos_weight * cosine_loss(pred, target) + smooth_l1_weight * smooth_l1(pred, target, smooth_l1_beta)
