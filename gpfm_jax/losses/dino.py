"""DINO CLS loss: cross-entropy between teacher targets and student log-probs over view pairs.

Views are stacked on a leading axis, [V, B, K]: the data pipeline's crop-major batch (index = view * B + image)
reshapes to it with `split_views`. Every student view is paired with every teacher global view except the same
view (2 x 1 global pairs + n_local x 2 local pairs = 18 for GPFM), and each pair contributes the batch mean of
-sum_k p_t log p_s. The loss is the average over pairs, which is what DINOv2's global-loss * 2 / 18 +
local-loss / 18 bookkeeping adds up to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_views(x: jax.Array, n_views: int) -> jax.Array:
    """Crop-major [V * B, ...] -> [V, B, ...]."""
    return x.reshape(n_views, x.shape[0] // n_views, *x.shape[1:])


def pair_cross_entropy(teacher_probs: jax.Array, student_log_probs: jax.Array) -> jax.Array:
    """[T, B, K] x [S, B, K] -> [S, T]: batch mean of -sum_k p_t log p_s for every (student, teacher) view pair."""
    return -jnp.einsum("tbk,sbk->st", teacher_probs, student_log_probs) / teacher_probs.shape[1]


def dino_loss(
    student_global_logits: jax.Array,
    teacher_probs: jax.Array,
    student_local_logits: jax.Array | None = None,
    student_temp: float = 0.1,
) -> jax.Array:
    """Average over view pairs of the DINO cross-entropy.

    student_global_logits [G, B, K] (head outputs of the student's global crops, view g = teacher view g),
    teacher_probs [G, B, K] (centered softmax or Sinkhorn targets of the teacher's global crops),
    student_local_logits [L, B, K] or None. Pairs: (g, g') with g != g', and every (l, g).
    """
    tp = teacher_probs.astype(jnp.float32)
    g = tp.shape[0]
    global_ce = pair_cross_entropy(tp, jax.nn.log_softmax(student_global_logits.astype(jnp.float32) / student_temp))
    total = jnp.sum(global_ce * (1.0 - jnp.eye(g, dtype=jnp.float32)))
    n_pairs = g * (g - 1)
    if student_local_logits is not None and student_local_logits.shape[0] > 0:
        local_lsm = jax.nn.log_softmax(student_local_logits.astype(jnp.float32) / student_temp)
        total = total + jnp.sum(pair_cross_entropy(tp, local_lsm))
        n_pairs += student_local_logits.shape[0] * g
    return total / n_pairs
