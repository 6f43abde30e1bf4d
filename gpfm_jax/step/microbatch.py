"""The batch layout of exact gradient accumulation: which rows and which groups each microbatch holds.

The global batch is split over `shards` devices (the mesh's batch axes), each holding B / shards contiguous rows.
Microbatch m takes the m-th of `k` contiguous chunks of every device's rows, so slicing a microbatch moves no data
between devices. A group of the batch (KoLeo's neighbourhoods and the iBOT centre's per-group means:
`batch_groups`; stochastic depth: `drop_path_groups`; the reference's per-GPU batches) is B / groups contiguous
rows; when groups is a multiple of shards x k every group lies inside one chunk, and the microbatch's groups are
contiguous in it in the same sizes: the same groups, relabelled. Group-symmetric terms (means over groups) are then
unchanged, and `group_ids` gives each microbatch group its index in the whole batch so that it draws the same
stochastic depth (`models.vit.group_keys`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from gpfm_jax.models.vit import batch_shards  # noqa: F401  (re-exported: the step reads the shard count here)


def check(batch_size: int, k: int, shards: int, **groups: int) -> None:
    """ValueError unless every device's rows split into k chunks and every group count into devices x chunks."""
    if batch_size % (shards * k):
        raise ValueError(f"batch {batch_size} does not split into {shards} devices x {k} microbatches")
    for name, g in groups.items():
        if g % (shards * k) or batch_size % g:
            raise ValueError(f"{name}={g}: a multiple of devices x microbatches ({shards} x {k}) dividing the batch "
                             f"{batch_size} is needed (a group must not straddle two microbatches)")


def chunks(x: jax.Array, k: int, shards: int) -> jax.Array:
    """[B, ...] -> [k, B / k, ...]: microbatch m = the m-th chunk of every device's rows, devices in order."""
    b = x.shape[0] // (shards * k)
    rest = x.shape[1:]
    y = jax.numpy.swapaxes(x.reshape((shards, k, b) + rest), 0, 1).reshape((k, shards * b) + rest)
    return nn.with_logical_constraint(y, (None, "batch") + (None,) * len(rest))


def group_ids(k: int, shards: int, groups: int) -> np.ndarray:
    """int32 [k, groups / k]: the index in the whole batch of each group of each microbatch."""
    per_device = groups // shards  # groups in a device's rows
    per_chunk = per_device // k  # ... in one of its chunks
    j = np.arange(groups // k)
    m = np.arange(k)[:, None]
    return ((j // per_chunk) * per_device + m * per_chunk + j % per_chunk).astype(np.int32)


def split(batch: Mapping[str, jax.Array], k: int, shards: int, batch_groups: int,
          drop_path_groups: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(the batch as k microbatches stacked on a leading axis, {"drop_path": the group ids of each microbatch})."""
    size = next(iter(batch.values())).shape[0]
    check(size, k, shards, batch_groups=batch_groups, drop_path_groups=drop_path_groups)
    stacked = {name: chunks(x, k, shards) for name, x in batch.items()}
    return stacked, {"drop_path": jax.numpy.asarray(group_ids(k, shards, drop_path_groups))}


def first(tree: Any) -> Any:
    """The first microbatch of a stacked tree (for shapes)."""
    return jax.tree_util.tree_map(lambda a: a[0], tree)
