"""iBOT block masks (BEiT-style) for the global crops of one batch, as DINOv2/GPFM's collate makes them.

Of the n_crops global crops, int(n_crops * mask_probability) are masked; the i-th masked crop asks for
int(n_patches * U(bins[i], bins[i+1])) patches with bins = linspace(ratio_min, ratio_max, n_masked + 1); the rest get
an empty mask; the list is then shuffled. A mask is grown from rectangular blocks (at least min_num_patches, aspect
ratio in [min_aspect, 1/min_aspect], at most max_num_patches per draw) that never overshoot the request.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    grid: tuple[int, int] = (16, 16)  # 224 / patch 14
    mask_probability: float = 0.5
    ratio_min: float = 0.1
    ratio_max: float = 0.5
    min_num_patches: int = 4
    max_num_patches: int | None = None  # None = 0.5 * grid area (DINOv2: 128 for 16x16)
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None = 1 / min_aspect

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def block_max(self) -> int:
        return int(0.5 * self.num_patches) if self.max_num_patches is None else self.max_num_patches

    @property
    def log_aspect(self) -> tuple[float, float]:
        hi = 1.0 / self.min_aspect if self.max_aspect is None else self.max_aspect
        return math.log(self.min_aspect), math.log(hi)


def _add_block(mask: np.ndarray, budget: int, rng: np.random.Generator, cfg: MaskingConfig) -> int:
    """Try (10 times) to mask one block adding at most `budget` new patches; returns how many were added."""
    H, W = mask.shape
    for _ in range(10):
        # random.uniform semantics (DINOv2): fine when budget < min_num_patches, the block then stays small.
        target = cfg.min_num_patches + (budget - cfg.min_num_patches) * rng.random()
        aspect = math.exp(rng.uniform(*cfg.log_aspect))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < W and h < H:
            top = int(rng.integers(0, H - h + 1))
            left = int(rng.integers(0, W - w + 1))
            region = mask[top : top + h, left : left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region[...] = True
                return new
    return 0


def block_mask(num_masked: int, rng: np.random.Generator, cfg: MaskingConfig) -> np.ndarray:
    """bool[grid] with at most num_masked True, grown block by block until the request is met or no block fits."""
    mask = np.zeros(cfg.grid, bool)
    count = 0
    while count < num_masked:
        added = _add_block(mask, min(num_masked - count, cfg.block_max), rng, cfg)
        if added == 0:
            break
        count += added
    return mask


def batch_masks(n_crops: int, rng: np.random.Generator, cfg: MaskingConfig) -> np.ndarray:
    """bool[n_crops, n_patches] for the global crops of one (per-host) batch, crop order = batch order."""
    n_masked = int(n_crops * cfg.mask_probability)
    bins = np.linspace(cfg.ratio_min, cfg.ratio_max, n_masked + 1)
    n = cfg.num_patches
    masks = np.zeros((n_crops, n), bool)
    for i in range(n_masked):
        masks[i] = block_mask(int(n * rng.uniform(bins[i], bins[i + 1])), rng, cfg).reshape(-1)
    return masks[rng.permutation(n_crops)]


def max_masked_tokens(n_crops: int, cfg: MaskingConfig) -> int:
    """Upper bound of `batch_masks(n_crops, ...).sum()`: the i-th masked crop asks for at most int(n * bins[i + 1])
    patches and `block_mask` never exceeds its request. Sizes the train step's fixed masked-token buffer."""
    n_masked = int(n_crops * cfg.mask_probability)
    bins = np.linspace(cfg.ratio_min, cfg.ratio_max, n_masked + 1)
    return int(sum(int(cfg.num_patches * bins[i + 1]) for i in range(n_masked)))
