"""uint8 pixels -> ImageNet-normalised arrays: the one place that knows ImageNet's mean/std and how a tile becomes
model input, for the train step (jitted, on the accelerator), the feature extractor (jitted) and host-side code
(the end-of-run probe, tests, tools: NumPy).

Why the step does it and not the host: a sample is 2 x 224^2 x 3 + 8 x 98^2 x 3 values; as float32 that is 2.1 MB
per image through worker IPC, host copies and the host-to-device link, as uint8 0.53 MB. The division and the cast
are free inside the jitted step. Call `normalize_batch` first thing inside the step (pure, jit-friendly).

Floating-point crops are taken as already normalised (the host's float32 path, `data.crop_dtype = "float32"`, and
the tests and tools that feed reference arrays) and are only cast.

JAX is imported inside the functions that need it: `data.augment` takes the mean/std from here, and the host-side
data modules and the slide tiling processes start without importing jax (see `gpfm_jax.data`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from gpfm_jax.data.batch import CROPS as IMAGE_KEYS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_pixels(x: Any, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     xp: Any = np) -> Any:
    """pixels [..., 3] in [0, 255] -> float32 (x / 255 - mean) / std. `xp` is the array module: numpy on the host
    (a NumPy result), jax.numpy inside jitted code; the same float32 operations in the same order either way."""
    x = x.astype(xp.float32) / xp.float32(255.0)
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def normalize_images(x: Any, dtype: Any = np.float32, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Any:
    """uint8 [..., 3] -> `normalize_pixels` (computed in float32) as `dtype`; a float input is only cast. JAX."""
    import jax.numpy as jnp

    if not jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(dtype)
    return normalize_pixels(x, mean, std, jnp).astype(dtype)


def input_dtype(*dtypes: Any) -> Any:
    """The widest of the dtypes the consumers compute in (student, teachers): nobody gets a narrower input than the
    float32 batch gave them, and a bfloat16-only model gets bfloat16."""
    import jax.numpy as jnp

    return jnp.result_type(*(jnp.dtype(d) for d in dtypes)) if dtypes else jnp.dtype(jnp.float32)


def normalize_batch(batch: Mapping[str, Any], *dtypes: Any, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    """The batch with its crops normalised and cast to `input_dtype(*dtypes)` (float32 if none are given)."""
    dtype = input_dtype(*dtypes)
    return {k: normalize_images(v, dtype, mean, std) if k in IMAGE_KEYS else v for k, v in batch.items()}
