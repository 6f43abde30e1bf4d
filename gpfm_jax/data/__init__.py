"""Data pipeline: tile sources, DINOv2 multi-crop augmentation, iBOT masks, grain batching (see docs/data.md)."""

from gpfm_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropConfig, multi_crop
from gpfm_jax.data.masking import MaskingConfig, batch_masks, block_mask
from gpfm_jax.data.pipeline import (
    PipelineConfig,
    checkpoint_args,
    get_state,
    host_shard,
    make_dataset,
    make_iterator,
    set_state,
)
from gpfm_jax.data.sources import (
    BadImageError,
    FolderSource,
    IndexSource,
    RobustSource,
    SlideTileSource,
    TfdsSource,
    decode_image,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MultiCropConfig", "multi_crop", "MaskingConfig", "batch_masks", "block_mask",
    "PipelineConfig", "checkpoint_args", "get_state", "host_shard", "make_dataset", "make_iterator", "set_state",
    "BadImageError", "FolderSource", "IndexSource", "RobustSource", "SlideTileSource", "TfdsSource", "decode_image",
]
