"""Tile preprocessing as an encoder bundle's JSON says: resize on the host (PIL, as torchvision on PIL images does in
the official pipelines), normalise on the device (`data.normalize.normalize_pixels` inside the jitted encoder, so
only uint8 crosses to it).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_PIL_FILTERS = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
}


def pil_filter(interpolation: str) -> int:
    try:
        return _PIL_FILTERS[interpolation.lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; known: {sorted(_PIL_FILTERS)}") from None


def resize_tile(tile: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]; a no-op when the tile already has that size."""
    if tile.shape[0] == size and tile.shape[1] == size:
        return np.ascontiguousarray(tile)
    return np.asarray(Image.fromarray(tile).resize((size, size), pil_filter(interpolation)))

