"""Resampling of learned absolute position embeddings to another patch grid.

Two rules exist in the PyTorch world and they give different numbers, so the rule is a config field:
- "dinov2": DINOv2/GPFM. Bicubic (a = -0.75) called with a *scale factor* ((g + 0.1) / M) and no antialias; PyTorch then
  maps output to input coordinates with that factor, not with out/in. Skipped only for the native square grid.
- "timm": timm's `resample_abs_pos_embed` (dynamic_img_size). Bicubic to the target *size*, antialiased.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

RESAMPLE_RULES = ("dinov2", "timm")


def resample_patch_pos_embed(
    patch_pos: jax.Array, grid_hw: tuple[int, int], rule: str, offset: float = 0.1
) -> jax.Array:
    """Resamples (1, M*M, D) patch position embeddings to (1, gh*gw, D) following `rule`."""
    _, n, dim = patch_pos.shape
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, which is not a square grid")
    gh, gw = grid_hw
    grid = patch_pos.reshape(m, m, dim).astype(jnp.float32)
    if rule == "dinov2":
        scale = jnp.array([(gh + offset) / m, (gw + offset) / m], jnp.float32)
        out = jax.image.scale_and_translate(
            grid,
            (gh, gw, dim),
            spatial_dims=(0, 1),
            scale=scale,
            translation=jnp.zeros(2, jnp.float32),
            method=jax.image.ResizeMethod.CUBIC_PYTORCH,
            antialias=False,
        )
    elif rule == "timm":
        out = jax.image.resize(grid, (gh, gw, dim), method=jax.image.ResizeMethod.CUBIC_PYTORCH, antialias=True)
    else:
        raise ValueError(f"unknown pos-embed resample rule {rule!r}; expected one of {RESAMPLE_RULES}")
    return out.reshape(1, gh * gw, dim).astype(patch_pos.dtype)


def needs_resampling(num_positions: int, grid_hw: tuple[int, int], rule: str) -> bool:
    """DINOv2 resamples unless the grid is the native *square* one; timm resamples whenever the grid differs."""
    gh, gw = grid_hw
    m = math.isqrt(num_positions)
    if rule == "dinov2":
        return not (gh * gw == num_positions and gh == gw)
    return (gh, gw) != (m, m)
