"""iBOT masked-patch loss on fixed-shape arrays.

Per image: mean cross-entropy over its masked patches; then the mean over ALL global crops (2B), so a crop without
masked patches adds 0 to the sum and 1 to the count. That is DINOv2's convention: each masked token is weighted by
1 / (masked tokens of its image) (`masks_weight`) and the weighted sum is divided by `masks.shape[0]`, the number
of global crops, masked or not (with GPFM's mask_probability 0.5 about half of them carry no mask).

The head is expensive at K = 65536, so the train step gathers the masked tokens into a fixed buffer of
`max_masked` rows (`select_masked`) before the head, like DINOv2's `upperbound` buffer; padding rows have weight 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_patch_weights(masks: jax.Array) -> jax.Array:
    """bool[I, N] -> f32[I, N]: 1 / (masked count of the image) on masked patches, 0 elsewhere."""
    m = masks.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)


def select_masked(tokens: jax.Array, masks: jax.Array, max_masked: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gather masked patch tokens into a fixed buffer.

    tokens [I, N, D], masks bool[I, N] -> (selected [M, D], weights f32[M], valid bool[M]) with M = max_masked,
    in row-major (image, patch) order. Rows past the number of masked tokens repeat token 0 and have weight 0 and
    valid False. Masked tokens beyond max_masked are dropped, so max_masked must bound the mask generator.
    """
    flat_masks = masks.reshape(-1)
    (index,) = jnp.nonzero(flat_masks, size=max_masked, fill_value=0)
    valid = jnp.arange(max_masked) < jnp.sum(flat_masks.astype(jnp.int32))
    weights = masked_patch_weights(masks).reshape(-1)[index] * valid
    selected = tokens.reshape(-1, tokens.shape[-1])[index]
    return selected, weights, valid


def ibot_loss(
    student_logits: jax.Array,
    teacher_probs: jax.Array,
    weights: jax.Array,
    num_images: int,
    student_temp: float = 0.1,
) -> jax.Array:
    """sum_j w_j * (-sum_k p_t[j] log p_s[j]) / num_images over gathered masked tokens.

    student_logits / teacher_probs [M, K] (or any leading shape matching `weights`); weights from
    `select_masked` or `masked_patch_weights`; num_images = number of global crops (2B).
    """
    lsm = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    ce = -jnp.sum(teacher_probs.astype(jnp.float32) * lsm, axis=-1)
    return jnp.sum(ce * weights.astype(jnp.float32)) / num_images


def ibot_loss_dense(
    student_logits: jax.Array, teacher_probs: jax.Array, masks: jax.Array, student_temp: float = 0.1
) -> jax.Array:
    """The same loss on full [I, N, K] grids (small models, tests)."""
    return ibot_loss(student_logits, teacher_probs, masked_patch_weights(masks), masks.shape[0], student_temp)
