"""iBOT block masks (BEiT-style) for the global crops of one batch, as DINOv2/GPFM's collate makes them.

Of the n_crops global crops, int(n_crops * mask_probability) are masked; the i-th masked crop asks for
int(n_patches * U(bins[i], bins[i+1])) patches with bins = linspace(ratio_min, ratio_max, n_masked + 1); the rest get
an empty mask; the list is then shuffled. A mask is grown from rectangular blocks (at least min_num_patches, aspect
ratio in [min_aspect, 1/min_aspect], at most max_num_patches per draw) that never overshoot the request.

The arithmetic follows the reference draw for draw: bins are float32 like `torch.linspace`, the ratio and the patch
count are float32 products like the collate's tensor arithmetic, every uniform is `lo + (hi - lo) * u`, integers
are `randint`-style and the shuffle is Python's Fisher-Yates (`random.shuffle`). Driven by the same uniform stream,
`batch_masks` reproduces DINOv2's `collate_data_and_cast` masks exactly (tests/test_fidelity_functions.py).
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


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 `torch.linspace(start, end, steps)` bit for bit: step = (end - start) / (steps - 1) in float32, then
    start + i * step in the first half and end - (steps - 1 - i) * step after, each with one rounding (fused)."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32(end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    low = (np.float64(start32) + step * i).astype(np.float32)
    high = (np.float64(end32) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, low, high)


def mask_bins(n_crops: int, cfg: MaskingConfig) -> np.ndarray:
    """float32 ratio bins of the masked crops of a batch: linspace(ratio_min, ratio_max, n_masked + 1)."""
    return torch_linspace_f32(cfg.ratio_min, cfg.ratio_max, int(n_crops * cfg.mask_probability) + 1)


def crop_mask_count(i: int, bins: np.ndarray, n_patches: int, rng: np.random.Generator) -> int:
    """Patches the i-th masked crop asks for: int(n * U(bins[i], bins[i + 1])), float32 as the collate computes it."""
    ratio = bins[i] + (bins[i + 1] - bins[i]) * np.float32(rng.random())
    return int(np.float32(n_patches) * np.float32(ratio))


def shuffled(items: list, rng: np.random.Generator) -> list:
    """Python's `random.shuffle` (Fisher-Yates from the end), drawing with `rng`."""
    items = list(items)
    for i in reversed(range(1, len(items))):
        j = int(rng.integers(0, i + 1))
        items[i], items[j] = items[j], items[i]
    return items


def _add_block(mask: np.ndarray, budget: int, rng: np.random.Generator, cfg: MaskingConfig) -> int:
    """Try (10 times) to mask one block adding at most `budget` new patches; returns how many were added."""
    H, W = mask.shape
    for _ in range(10):
        # random.uniform semantics (DINOv2): fine when budget < min_num_patches, the block then stays small.
        target = cfg.min_num_patches + (budget - cfg.min_num_patches) * rng.random()
        lo, hi = cfg.log_aspect
        aspect = math.exp(lo + (hi - lo) * rng.random())
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
    """bool[n_crops, n_patches] for the global crops of one (per-shard) batch, crop order = batch order."""
    n, bins = cfg.num_patches, mask_bins(n_crops, cfg)
    masks = [block_mask(crop_mask_count(i, bins, n, rng), rng, cfg).reshape(-1) for i in range(len(bins) - 1)]
    masks += [np.zeros(n, bool)] * (n_crops - len(masks))
    return np.stack(shuffled(masks, rng))


def max_masked_tokens(n_crops: int, cfg: MaskingConfig) -> int:
    """Upper bound of `batch_masks(n_crops, ...).sum()` (the reference collate's `upperbound`): the i-th masked crop
    asks for at most int(n * bins[i + 1]) patches and `block_mask` never exceeds its request. Sizes the train step's
    fixed masked-token buffer."""
    bins = mask_bins(n_crops, cfg)
    return int(sum(int(np.float32(cfg.num_patches) * bins[i + 1]) for i in range(len(bins) - 1)))
