"""Teacher targets: softmax with an EMA center (DINO/iBOT), or Sinkhorn-Knopp (DINOv2's alternative).

Pure functions: the center is state the train step carries. The step computes the batch mean of the teacher logits
itself (over the global batch, i.e. all-reduced; `batch_mean` does that for a global jax.Array under jit), uses the
OLD center for this step's targets and stores `update_center(old, batch_mean)` for the next step, which is the order
DINOv2 follows (its center update is applied lazily at the start of the next step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_center(dim: int) -> jax.Array:
    """DINOv2 starts both centers (CLS and patch) at zero: shape (1, K) there, (K,) here."""
    return jnp.zeros((dim,), jnp.float32)


def centered_softmax(teacher_logits: jax.Array, center: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """softmax((t - center) / tau) over the last axis, in float32."""
    t = teacher_logits.astype(jnp.float32) - center.astype(jnp.float32)
    return jax.nn.softmax(t / temperature, axis=-1)


def batch_mean(teacher_logits: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean over all leading axes (the batch); with `valid` (bool, leading shape) only over valid rows, or with float
    row weights summing to 1 (`group_mean_weights`) the weighted sum.

    For iBOT the rows are the gathered masked patch tokens plus padding; DINOv2 averages over the masked tokens.
    """
    x = teacher_logits.astype(jnp.float32).reshape(-1, teacher_logits.shape[-1])
    if valid is None:
        return jnp.mean(x, axis=0)
    if jnp.issubdtype(valid.dtype, jnp.floating):
        return jnp.sum(x * valid.reshape(-1)[:, None], axis=0)
    w = valid.reshape(-1).astype(jnp.float32)
    return jnp.sum(x * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)


def group_mean_weights(masks: jax.Array, max_rows: int, num_groups: int) -> jax.Array:
    """Row weights for the masked-token buffer of `select_masked(tokens, masks, max_rows)` that make
    `batch_mean(x, weights)` the mean over `num_groups` contiguous image groups of each group's token mean.

    That is DINOv2's iBOT centre: each GPU averages its own masked tokens and the all-reduce averages those means,
    each GPU weighing the same whatever its token count. With one group it is the plain token mean.
    masks bool[I, N] (images in batch order, I divisible by num_groups) -> f32[max_rows].
    """
    counts = jnp.sum(masks.reshape(num_groups, -1).astype(jnp.int32), axis=1)  # masked tokens per group
    rows = jnp.arange(max_rows)
    # the buffer is in (image, patch) order; compare_all: no loop in the program (a sharded while loop with
    # collectives inside deadlocked two-process CPU runs)
    group = jnp.searchsorted(jnp.cumsum(counts), rows, side="right", method="compare_all")
    valid = group < num_groups
    per_row = 1.0 / (num_groups * jnp.maximum(counts[jnp.minimum(group, num_groups - 1)], 1).astype(jnp.float32))
    return jnp.where(valid, per_row, 0.0)


def update_center(center: jax.Array, batch_center: jax.Array, momentum: float = 0.9) -> jax.Array:
    """EMA: center * m + batch_center * (1 - m)."""
    return center * momentum + batch_center.astype(center.dtype) * (1.0 - momentum)


def sinkhorn_knopp(
    teacher_logits: jax.Array,
    temperature: float | jax.Array,
    n_iterations: int = 3,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Sinkhorn-Knopp teacher targets [N, K] (DINOv2 `sinkhorn_knopp_teacher`), rows summing to 1.

    Q = exp(t / tau), normalised to total mass 1, then `n_iterations` of: rows of the K x N matrix (prototypes) to
    1/K, columns (samples) to 1/N; finally scaled by N. N counts only `valid` rows (padding gets 0).

    Computed in the log domain (logsumexp normalisations): the same function, but where the reference's float32
    exp(t / tau) overflows (t / tau > 88, e.g. logits above 3.5 at tau 0.04: NaN targets there) or a sample's whole
    row underflows, this stays exact. tests/test_fidelity_functions.py checks both regimes.
    """
    t = teacher_logits.astype(jnp.float32).reshape(-1, teacher_logits.shape[-1])
    w = jnp.ones((t.shape[0],), bool) if valid is None else valid.reshape(-1)
    n = jnp.maximum(jnp.sum(w.astype(jnp.float32)), 1.0)
    k = t.shape[-1]
    mask = w[:, None]
    log_q = jnp.where(mask, t / temperature, -jnp.inf)  # [N, K] = log Q^T
    log_q = log_q - jax.nn.logsumexp(log_q)
    for _ in range(n_iterations):
        log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - jnp.log(k)  # prototypes to 1/K
        row = jax.nn.logsumexp(log_q, axis=1, keepdims=True)
        log_q = jnp.where(mask, log_q - jnp.where(mask, row, 0.0) - jnp.log(n), -jnp.inf)  # samples to 1/N
    return (jnp.exp(log_q) * n).reshape(teacher_logits.shape)


def teacher_targets(
    teacher_logits: jax.Array,
    center: jax.Array,
    temperature: float | jax.Array,
    method: str = "centering",
    momentum: float = 0.9,
    n_iterations: int = 3,
    valid: jax.Array | None = None,
    center_weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(targets, next center) by the configured method; Sinkhorn-Knopp leaves the center as it is (DINOv2).
    `center_weights` (e.g. `group_mean_weights`) replaces `valid` in the centre's batch mean."""
    if method == "centering":
        weights = valid if center_weights is None else center_weights
        return centered_softmax(teacher_logits, center, temperature), update_center(
            center, batch_mean(teacher_logits, weights), momentum)
    if method == "sinkhorn_knopp":
        return sinkhorn_knopp(teacher_logits, temperature, n_iterations, valid), center
    raise ValueError(f"unknown centering method {method!r}")
