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
    """Mean over all leading axes (the batch); with `valid` (bool, leading shape) only over valid rows.

    For iBOT the rows are the gathered masked patch tokens plus padding; DINOv2 averages over the masked tokens.
    """
    x = teacher_logits.astype(jnp.float32).reshape(-1, teacher_logits.shape[-1])
    if valid is None:
        return jnp.mean(x, axis=0)
    w = valid.reshape(-1).astype(jnp.float32)
    return jnp.sum(x * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)


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
    1/K, columns (samples) to 1/N; finally scaled by N. N counts only `valid` rows (padding gets 0). Subtracting the
    global max before exp changes nothing after the first normalisation but keeps exp finite at tau = 0.04.
    """
    t = teacher_logits.astype(jnp.float32).reshape(-1, teacher_logits.shape[-1])
    w = jnp.ones((t.shape[0],), jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
    t_max = jnp.max(jnp.where(w[:, None] > 0, t, -jnp.inf))
    t_max = jnp.where(jnp.isfinite(t_max), t_max, 0.0)  # no valid row at all
    q = jnp.exp((t - jax.lax.stop_gradient(t_max)) / temperature) * w[:, None]  # [N, K] = Q^T
    n = jnp.maximum(jnp.sum(w), 1.0)
    k = t.shape[-1]
    q = q / jnp.sum(q)
    for _ in range(n_iterations):
        q = q / jnp.maximum(jnp.sum(q, axis=0, keepdims=True), 1e-30) / k  # each prototype gets mass 1/K
        q = q / jnp.maximum(jnp.sum(q, axis=1, keepdims=True), 1e-30) / n  # each sample gets mass 1/N
    return (q * n).reshape(teacher_logits.shape)


def teacher_targets(
    teacher_logits: jax.Array,
    center: jax.Array,
    temperature: float | jax.Array,
    method: str = "centering",
    momentum: float = 0.9,
    n_iterations: int = 3,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(targets, next center) by the configured method; Sinkhorn-Knopp leaves the center as it is (DINOv2)."""
    if method == "centering":
        return centered_softmax(teacher_logits, center, temperature), update_center(
            center, batch_mean(teacher_logits, valid), momentum)
    if method == "sinkhorn_knopp":
        return sinkhorn_knopp(teacher_logits, temperature, n_iterations, valid), center
    raise ValueError(f"unknown centering method {method!r}")
