"""The training batch: its keys, its layout and its shapes, written once.

A batch is made by the host pipeline (`data/pipeline.py`: one data shard's records, cropped, collated, masked),
merged over this process's shards, read ahead and put on the devices by `train/data_stream.py`, and taken by the
train step (`step/train_step.py`, which normalises uint8 crops first: `data/normalize.py`).

Per process (B = global_batch_size / process_count; on the devices B = global_batch_size, the leading axis split
over the mesh's batch axes), T = data.crop_dtype (uint8 pixels, or host-normalised float32):

  global_crops T[B, 2, G, G, 3]        sample-major: the train step's layout, so all views of a sample stay on one
  local_crops  T[B, N, L, L, 3]        device and no host re-copy is needed (DINOv2's collate is view-major [2B, ...])
  masks        bool[B, 2, (G/patch)^2] iBOT masks, masks[b, v] belongs to global_crops[b, v]
  num_skipped  int32[]                 unreadable records replaced while building it (a metric; host only: the feed
                                       takes it off before the transfer)

G = data.multicrop.global_size, L = local_size, N = num_local_crops, patch = model.vit.patch_size.
This module imports no jax at load time: the keys are used by the host pipeline's workers.
"""

from __future__ import annotations

from typing import Any

GLOBAL_CROPS = "global_crops"
LOCAL_CROPS = "local_crops"
MASKS = "masks"
NUM_SKIPPED = "num_skipped"
CROPS = (GLOBAL_CROPS, LOCAL_CROPS)  # the image arrays (normalised in the step)


def batch_spec(data_cfg: Any, patch_size: int, batch_size: int) -> dict[str, Any]:
    """The step's batch as ShapeDtypeStructs: `batch_size` samples of the crops and masks `data_cfg` (a
    `PipelineConfig` or the run's `DataConfig`) makes, for ViT patches of `patch_size` (num_skipped stays on the
    host, so it is not part of it)."""
    import jax
    import jax.numpy as jnp

    mc, b = data_cfg.multicrop, batch_size
    g, loc = mc.global_size, mc.local_size
    crops = jnp.dtype(data_cfg.crop_dtype)  # uint8 by default: normalised inside the step (gpfm_jax.data.normalize)
    return {
        GLOBAL_CROPS: jax.ShapeDtypeStruct((b, 2, g, g, 3), crops),
        LOCAL_CROPS: jax.ShapeDtypeStruct((b, mc.num_local_crops, loc, loc, 3), crops),
        MASKS: jax.ShapeDtypeStruct((b, 2, (g // patch_size) ** 2), jnp.bool_),
    }
