"""Data pipeline: tile sources, DINOv2 multi-crop augmentation, iBOT masks, grain batching (see docs/data.md).

The names below are loaded on first use (PEP 562): `gpfm_jax.data.slides` or the gpfm-index tools, and the slide
tiling processes they spawn, then start without importing grain and jax (~2.5 s per process here).
"""

import importlib

_EXPORTS = {
    "gpfm_jax.data.augment": ("IMAGENET_MEAN", "IMAGENET_STD", "MultiCropConfig", "multi_crop"),
    "gpfm_jax.data.masking": ("MaskingConfig", "batch_masks", "block_mask"),
    "gpfm_jax.data.pipeline": ("PipelineConfig", "host_shard", "make_dataset", "make_iterator"),
    "gpfm_jax.data.sources": ("BadImageError", "FolderSource", "IndexSource", "RobustSource", "SlideTileSource",
                              "TfdsSource", "decode_image"),
    "gpfm_jax.data.index": ("PackedSource", "SlideIndexSource", "TileIndex", "TileIndexSource"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'gpfm_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
