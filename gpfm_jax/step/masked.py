"""Where the masked patch tokens are gathered before the 65536-way iBOT head: per device, or over the whole batch.

The head runs on a fixed-size buffer of the masked tokens (DINOv2's upper-bound buffer). Gathered over the whole
(global) batch, the buffer's rows come from every device: XLA all-reduces the gathered tokens (teacher and student,
forward and backward) and, the buffer being one unsharded array, runs the head on all of it on every device (the
official step on 8 devices: two all-reduces of bf16[58675, 1024] and the iBOT head replicated, ~5% of the step,
gpfm-plan). Gathered per device instead, each device fills its own buffer from its own images: no token crosses
devices and the head runs on 1/devices of the rows. The buffer per device is the exact bound of one device's share
(`gpfm_jax.train.config.masked_bounds`); the set of tokens, their weights and the per-group centre weights are the
same, only their order differs (the losses and the centre are sums over the rows).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpfm_jax import losses
from gpfm_jax.models.vit import batch_shards


@dataclasses.dataclass(frozen=True)
class MaskedSelection:
    """masks bool[I, N] (images in batch order) gathered into `shards` buffers of `rows` rows each."""

    masks: jax.Array
    rows: int
    groups: int
    shards: int = 1

    def tokens(self, patch: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """patch [I, N, D] -> (selected [shards * rows, D], weights, valid), as `losses.select_masked`."""
        if self.shards == 1:
            return losses.select_masked(patch, self.masks, self.rows)
        s = self.shards
        per = patch.reshape((s, -1) + patch.shape[1:])
        masks = self.masks.reshape((s, -1) + self.masks.shape[1:])
        selected, weights, valid = jax.vmap(losses.select_masked, (0, 0, None))(per, masks, self.rows)
        selected = nn.with_logical_constraint(selected, ("batch", None, "embed"))
        return selected.reshape((-1, patch.shape[-1])), weights.reshape(-1), valid.reshape(-1)

    @property
    def center_weights(self) -> jax.Array:
        """Row weights making the iBOT centre's batch mean the mean over groups of each group's token mean."""
        if self.shards == 1:
            return losses.group_mean_weights(self.masks, self.rows, self.groups)
        masks = self.masks.reshape((self.shards, -1) + self.masks.shape[1:])
        per_shard = jax.vmap(losses.group_mean_weights, (0, None, None))(masks, self.rows, self.groups // self.shards)
        return per_shard.reshape(-1) / self.shards

    @property
    def overflow(self) -> jax.Array:
        """Masked tokens that did not fit their buffer (dropped): 0 when the buffer sizes are the exact bounds."""
        counts = jnp.sum(self.masks.reshape(self.shards, -1).astype(jnp.int32), axis=1)
        return jnp.sum(jnp.maximum(counts - self.rows, 0))


def masked_selection(masks: jax.Array, max_masked: int, groups: int,
                     shard_max_masked: tuple[int, int] = (0, 0)) -> MaskedSelection:
    """Per device when the step config carries a per-device bound computed for the number of devices the batch is
    split over here (and groups and images split evenly over them); otherwise over the whole batch."""
    devices, per_device = shard_max_masked
    shards = batch_shards()
    if shards > 1 and devices == shards and per_device > 0 and groups % shards == 0 and masks.shape[0] % shards == 0:
        return MaskedSelection(masks, per_device, groups, shards)
    return MaskedSelection(masks, max_masked, groups)
