"""Collapse signals: cheap per-batch statistics of the EMA teacher, computed inside the step from tensors it already
has (the DINO CLS targets and the teacher's CLS features) and returned with the loss metrics under `collapse/`.

Why these: self-distillation collapses in ways the total loss does not show (KoLeo, iBOT and the distillation terms
keep falling). The kinds and what tells them apart (train/collapse.py reads them):
  uniform    every image's target ~uniform: per-sample teacher entropy ~ln K (and the DINO loss ~ln K)
  one-hot    every image to the same few prototypes: per-sample entropy ~0 *and* the batch-mean target also
             concentrated (few prototypes in use); a sharp but healthy teacher has low per-sample entropy with a
             high batch-mean entropy (different images, different prototypes)
  representation  the CLS features of different images nearly identical: spread ~0

Gradient accumulation: the signals are computed from per-(micro)batch quantities — the mean per-sample entropy, the
mean target (f32[K]), and the mean and variance of the normalised CLS (f32[D]) — which the step's microbatch scan
averages like any metric, except the CLS means, which it stacks (`STACKED`, f32[k, D]); `finalize` turns them into
the scalars after the scan. The variance of the whole batch is the pooled one, the mean of the microbatch variances
plus the variance of the microbatch means, each computed about its own mean (a variance from E[x^2] - E[x]^2 loses
its digits when every image has almost the same feature, exactly the case to measure). So the signals with k
microbatches are the full batch's up to float rounding (test_accumulation.py holds them to the losses' tolerance),
not a mean of smaller batches' statistics. With Sinkhorn-Knopp centring the batch-mean target is forced uniform, so
`batch_entropy` is ~1 by construction and only the per-sample and feature signals inform.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PREFIX = "collapse/"


def _entropy(p: jax.Array) -> jax.Array:
    """Entropy in nats along the last axis (0 log 0 = 0)."""
    p = p.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def target_signals(probs: jax.Array) -> dict[str, jax.Array]:
    """The one-batch definitions (the step computes the same through `batch_moments` + `finalize`):
    probs f32[N, K] (the teacher's DINO targets, rows summing to 1) ->
    teacher_entropy: mean per-sample entropy / ln K (1 = uniform for every image, 0 = one-hot);
    batch_entropy: entropy of the batch-mean target / ln K (0 = every image on the same prototype);
    prototypes_used: exp(entropy of the batch-mean target), the effective number of prototypes the batch uses."""
    k = probs.shape[-1]
    mean = jnp.mean(probs.astype(jnp.float32), axis=0)
    h_batch = _entropy(mean)
    return {
        "teacher_entropy": jnp.mean(_entropy(probs)) / math.log(k),
        "batch_entropy": h_batch / math.log(k),
        "prototypes_used": jnp.exp(h_batch),
    }


def feature_spread(features: jax.Array) -> jax.Array:
    """features f32[N, D] -> sqrt(D) x (the mean over dimensions of the standard deviation across the batch of the
    L2-normalised features). The per-dimension std is the statistic DINOv2 users watch (~1/sqrt(D) for features
    spread over the sphere); scaled by sqrt(D) it reads ~1 for well-spread features (at most 1: the summed variance
    of unit vectors is 1 - |mean|^2) and 0 when every image has the same feature."""
    x = features.astype(jnp.float32)
    x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
    return jnp.mean(jnp.std(x, axis=0)) * math.sqrt(x.shape[-1])


_MOMENTS = ("_mean_target", "_cls_mean", "_cls_var")
STACKED = (PREFIX + "_cls_mean",)  # stacked over microbatches by the step's scan, not averaged


def batch_moments(dino_probs: jax.Array, teacher_cls: jax.Array) -> dict[str, jax.Array]:
    """What one (micro)batch contributes, over its global crops: the mean per-sample entropy / ln K, the mean target
    f32[K], the mean f32[D] and the variance about that mean f32[D] of the L2-normalised teacher CLS. `finalize`
    makes the `collapse/*` scalars (after the step's microbatch scan)."""
    p = dino_probs.astype(jnp.float32)
    x = teacher_cls.astype(jnp.float32)
    x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
    mean = jnp.mean(x, axis=0)
    return {PREFIX + "teacher_entropy": jnp.mean(_entropy(p)) / math.log(p.shape[-1]),
            PREFIX + "_mean_target": jnp.mean(p, axis=0),
            PREFIX + "_cls_mean": mean, PREFIX + "_cls_var": jnp.mean(jnp.square(x - mean), axis=0)}


def finalize(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The metrics with the moments of `batch_moments` replaced by the scalars batch_entropy, prototypes_used and
    cls_spread (same definitions as `target_signals` / `feature_spread`). `_cls_mean` is f32[D] (one batch) or
    f32[k, D] (the step's k microbatches, stacked); `_cls_var` the mean of the k within-microbatch variances."""
    out = {k: v for k, v in metrics.items() if not (k.startswith(PREFIX) and k[len(PREFIX):] in _MOMENTS)}
    mean = metrics[PREFIX + "_mean_target"]
    h_batch = _entropy(mean)
    out[PREFIX + "batch_entropy"] = h_batch / math.log(mean.shape[-1])
    out[PREFIX + "prototypes_used"] = jnp.exp(h_batch)
    mus = jnp.atleast_2d(metrics[PREFIX + "_cls_mean"])
    between = jnp.mean(jnp.square(mus - jnp.mean(mus, axis=0)), axis=0)
    var = metrics[PREFIX + "_cls_var"] + between
    out[PREFIX + "cls_spread"] = jnp.mean(jnp.sqrt(var)) * math.sqrt(mus.shape[-1])
    return out
