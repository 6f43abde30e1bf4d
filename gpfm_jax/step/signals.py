"""Collapse signals: cheap per-batch statistics of the EMA teacher, computed inside the step from tensors it already
has (the DINO CLS targets and the teacher's CLS features) and returned with the loss metrics under `collapse/`.

Why these: self-distillation collapses in ways the total loss does not show (KoLeo, iBOT and the distillation terms
keep falling). The kinds and what tells them apart (train/collapse.py reads them):
  uniform    every image's target ~uniform: per-sample teacher entropy ~ln K (and the DINO loss ~ln K)
  one-hot    every image to the same few prototypes: per-sample entropy ~0 *and* the batch-mean target also
             concentrated (few prototypes in use); a sharp but healthy teacher has low per-sample entropy with a
             high batch-mean entropy (different images, different prototypes)
  representation  the CLS features of different images nearly identical: spread ~0

Gradient accumulation: every signal is a function of per-(micro)batch means — the mean target (f32[K]), the
mean and mean square of the normalised CLS (f32[D]) and the mean per-sample entropy — which the step's microbatch
scan averages like any metric (equal-sized microbatches: the mean of the means is the batch's mean); `finalize`
turns them into the scalars after the scan, so the signals with k microbatches are the full batch's (up to float
summation order), not a mean of smaller batches' statistics. With Sinkhorn-Knopp centring the batch-mean target is
forced uniform, so `batch_entropy` is ~1 by construction and only the per-sample and feature signals inform.
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
    """probs f32[N, K] (the teacher's DINO targets, rows summing to 1) ->
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


_MOMENTS = ("_mean_target", "_cls_mean", "_cls_square")


def batch_moments(dino_probs: jax.Array, teacher_cls: jax.Array) -> dict[str, jax.Array]:
    """What one (micro)batch contributes, all means over its global crops: the mean per-sample entropy / ln K, the
    mean target f32[K], the mean and mean square of the L2-normalised teacher CLS f32[D]. Averaged over
    microbatches by the step; `finalize` makes the `collapse/*` scalars."""
    p = dino_probs.astype(jnp.float32)
    x = teacher_cls.astype(jnp.float32)
    x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
    return {PREFIX + "teacher_entropy": jnp.mean(_entropy(p)) / math.log(p.shape[-1]),
            PREFIX + "_mean_target": jnp.mean(p, axis=0),
            PREFIX + "_cls_mean": jnp.mean(x, axis=0), PREFIX + "_cls_square": jnp.mean(x * x, axis=0)}


def finalize(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The metrics with the moments of `batch_moments` replaced by the scalars batch_entropy, prototypes_used and
    cls_spread (same definitions as `target_signals` / `feature_spread`)."""
    out = {k: v for k, v in metrics.items() if k[len(PREFIX):] not in _MOMENTS}
    mean = metrics[PREFIX + "_mean_target"]
    h_batch = _entropy(mean)
    out[PREFIX + "batch_entropy"] = h_batch / math.log(mean.shape[-1])
    out[PREFIX + "prototypes_used"] = jnp.exp(h_batch)
    mu = metrics[PREFIX + "_cls_mean"]
    var = jnp.maximum(metrics[PREFIX + "_cls_square"] - mu * mu, 0.0)
    out[PREFIX + "cls_spread"] = jnp.mean(jnp.sqrt(var)) * math.sqrt(mu.shape[-1])
    return out
