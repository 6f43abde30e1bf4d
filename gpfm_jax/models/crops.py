"""Several crop sets through one ViT: their tokens as one matrix for the linear layers, attention per set.

DINOv2 runs the student's global (224 px, 257 tokens) and local (98 px, 50 tokens) crops through each block
together (a block-diagonal attention mask over the concatenated tokens), so that the LayerNorms, QKV, output
projection and MLP see one large matrix instead of two. Here the crop sets stay separate arrays for attention
(each its own dense attention, no mask) and are concatenated for everything row-wise. Row-wise layers give each
token's row the same result either way (up to fp32 rounding of the matmul blocking), so the forward equals the
separate forwards. The concatenation keeps the batch sharding: each set [b, n, d] is viewed as
[shards, b / shards * n, d] (shards = the devices the batch axis is split over) and the sets are concatenated on
the second axis, so every device concatenates its own rows and no activation crosses devices.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from gpfm_jax.models.drop_path import batch_shards

# drop path rng stream of each crop set: set i draws from its own stream what a forward of set i alone draws from
# "drop_path" (flax derives a stream's keys from its root key and the module path, not from its name)
STREAMS = ("drop_path", "drop_path_1", "drop_path_2", "drop_path_3")


def shards(sets: Sequence[tuple[int, int]]) -> int:
    """The shard count the concatenation is laid out for: the batch shards if every set's batch splits over them."""
    n = batch_shards()
    return n if all(b % n == 0 for b, _ in sets) else 1


def concat(ys: Sequence[jax.Array], n_shards: int) -> jax.Array:
    """[b_i, n_i, d] arrays -> [shards, sum_i b_i n_i / shards, d], each shard's rows of every set together."""
    return jnp.concatenate([y.reshape((n_shards, -1, y.shape[-1])) for y in ys], axis=1)


def split(z: jax.Array, sets: Sequence[tuple[int, int]], n_shards: int) -> list[jax.Array]:
    """The inverse of `concat`: [shards, T / shards, f] -> [b_i, n_i, f] for the sets' (b_i, n_i)."""
    sizes = [b * n // n_shards for b, n in sets]
    bounds = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    return [part.reshape((b, n, z.shape[-1])) for part, (b, n) in zip(jnp.split(z, bounds, axis=1), sets)]
