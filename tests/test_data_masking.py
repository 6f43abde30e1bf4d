"""iBOT block masks: share of masked crops, per-crop ratio bins, block shape."""

import math

import numpy as np
import scipy.ndimage as ndi

from gpfm_jax.data.masking import MaskingConfig, _add_block, batch_masks, block_mask

CFG = MaskingConfig()


def test_defaults_match_spec():
    assert CFG.grid == (16, 16) and CFG.num_patches == 256
    assert (CFG.mask_probability, CFG.ratio_min, CFG.ratio_max) == (0.5, 0.1, 0.5)
    assert CFG.min_num_patches == 4 and CFG.block_max == 128
    assert np.allclose(np.exp(CFG.log_aspect), (0.3, 1 / 0.3))


def test_share_of_masked_crops_and_ratio_bins():
    rng = np.random.default_rng(0)
    for n_crops in (2, 8, 64, 192):
        for _ in range(3):
            m = batch_masks(n_crops, rng, CFG)
            assert m.shape == (n_crops, 256) and m.dtype == bool
            counts = m.sum(1)
            n_masked = int(n_crops * 0.5)
            assert (counts > 0).sum() == n_masked
            # the i-th masked crop draws its ratio from the i-th bin; bins are increasing, so after sorting the
            # non-empty counts, count i lies in bin i (the block sampler may stop up to a few patches short)
            bins = np.linspace(0.1, 0.5, n_masked + 1)
            got = np.sort(counts[counts > 0])
            for i, c in enumerate(got):
                assert c <= int(256 * bins[i + 1])
                assert c >= int(256 * bins[i]) - 4


def test_masked_crops_are_shuffled():
    rng = np.random.default_rng(1)
    first_half = [batch_masks(16, rng, CFG)[:8].any(1).mean() for _ in range(50)]
    assert 0.3 < np.mean(first_half) < 0.7  # not always the first n_masked rows


def test_single_block_is_a_solid_rectangle_in_aspect_bounds():
    rng = np.random.default_rng(2)
    for _ in range(500):
        mask = np.zeros(CFG.grid, bool)
        added = _add_block(mask, 128, rng, CFG)
        assert added == mask.sum() > 0
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert h * w == added  # the bounding box is full: one contiguous rectangle
        assert added <= 128
        # round() of sqrt(area*aspect) can push the realised aspect a little past the bounds for tiny blocks
        assert 0.3 / 2.5 <= w / h <= 2.5 / 0.3
        assert 2 <= added  # min 4 patches requested; rounding h, w can shrink a 4-patch draw to 2x1


def test_masks_are_blocky_not_scattered():
    rng = np.random.default_rng(3)
    sizes = []
    for _ in range(200):
        target = int(256 * rng.uniform(0.1, 0.5))
        m = block_mask(target, rng, CFG)
        assert target - 4 <= m.sum() <= target
        labels, n = ndi.label(m)
        sizes.extend(np.bincount(labels.ravel())[1:])
    # random (unblocked) masking at these ratios gives mean component sizes of a few patches
    assert np.mean(sizes) > 15


def test_zero_request_and_deterministic():
    assert not block_mask(0, np.random.default_rng(0), CFG).any()
    a = batch_masks(32, np.random.default_rng([5, 1]), CFG)
    b = batch_masks(32, np.random.default_rng([5, 1]), CFG)
    assert np.array_equal(a, b)


def test_other_grid():
    cfg = MaskingConfig(grid=(4, 4))
    m = batch_masks(8, np.random.default_rng(0), cfg)
    assert m.shape == (8, 16) and (m.sum(1) > 0).sum() == 4
    assert math.isclose(cfg.block_max, 8)


def test_max_masked_tokens_bounds_every_batch_and_is_tight():
    from gpfm_jax.data.masking import max_masked_tokens

    cfg = MaskingConfig()
    rng = np.random.default_rng(1)
    bound = max_masked_tokens(16, cfg)
    counts = [int(batch_masks(16, rng, cfg).sum()) for _ in range(200)]
    assert max(counts) <= bound
    assert max(counts) >= 0.9 * bound  # the buffer is not much larger than needed
