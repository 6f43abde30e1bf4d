"""The last step of the augmentation, on the accelerator: uint8 crops -> ImageNet-normalised compute-dtype arrays.

Why here and not on the host: a sample is 2 x 224^2 x 3 + 8 x 98^2 x 3 values; as float32 that is 2.1 MB per image
through worker IPC, host copies and the host-to-device link, as uint8 0.53 MB. The division and the cast are
free inside the jitted step. Call it first thing inside the step (pure, jit-friendly).

Floating-point crops are taken as already normalised (the host's float32 path, `data.crop_dtype = "float32"`, and
the tests and tools that feed reference arrays) and are only cast.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from gpfm_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from gpfm_jax.data.batch import CROPS as IMAGE_KEYS


def normalize_images(x: Any, dtype: Any = jnp.float32, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Any:
    """uint8 [..., 3] -> ((x / 255 - mean) / std) as `dtype`, computed in float32; a float input is only cast."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(dtype)
    x = x.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def input_dtype(*dtypes: Any) -> Any:
    """The widest of the dtypes the consumers compute in (student, teachers): nobody gets a narrower input than the
    float32 batch gave them, and a bfloat16-only model gets bfloat16."""
    return jnp.result_type(*(jnp.dtype(d) for d in dtypes)) if dtypes else jnp.dtype(jnp.float32)


def normalize_batch(batch: Mapping[str, Any], *dtypes: Any, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    """The batch with its crops normalised and cast to `input_dtype(*dtypes)` (float32 if none are given)."""
    dtype = input_dtype(*dtypes)
    return {k: normalize_images(v, dtype, mean, std) if k in IMAGE_KEYS else v for k, v in batch.items()}


def normalize_numpy(x: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """NumPy twin of `normalize_images` (float32), for tests and host-side tools."""
    x = x.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
