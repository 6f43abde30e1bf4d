"""Multi-crop augmentation: crop geometry, decision probabilities, determinism, op semantics vs torchvision."""

import dataclasses
import math

import numpy as np
import pytest
from conftest import require
from PIL import Image

from gpfm_jax.data import augment as A

CFG = A.MultiCropConfig()


def _binomial_ok(hits: int, n: int, p: float, z: float = 5.0) -> bool:
    """hits within z standard deviations of n*p (z=5: a false failure about once in 3.5 million runs)."""
    return abs(hits - n * p) <= z * math.sqrt(max(n * p * (1 - p), 1e-12)) + 1e-9


@pytest.mark.parametrize("scale", [CFG.global_scale, CFG.local_scale])
def test_rrc_area_and_aspect_within_bounds(scale):
    rng = np.random.default_rng(0)
    H = W = 512
    fr, ar = [], []
    for _ in range(4000):
        top, left, h, w = A.rrc_params(rng, H, W, scale, CFG.ratio)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        fr.append(h * w / (H * W))
        ar.append(w / h)
    fr, ar = np.array(fr), np.array(ar)
    # rounding w and h to integers moves the area by at most ~(w + h + 1) pixels
    tol = 2 * 2 * 512 / (H * W)
    assert fr.min() >= scale[0] - tol and fr.max() <= scale[1] + tol
    assert ar.min() >= CFG.ratio[0] * 0.97 and ar.max() <= CFG.ratio[1] * 1.03
    # area is uniform in [lo, hi] when no try is rejected (true for the local scale; large global crops with an
    # aspect != 1 overflow the tile and are redrawn, as in torchvision, which lowers the mean)
    if scale[1] <= 0.5:
        assert abs(fr.mean() - sum(scale) / 2) < 0.02 * (scale[1] - scale[0]) + 0.01


def test_rrc_fallback_is_central_crop():
    rng = np.random.default_rng(0)
    # an extreme aspect image where no random try can fit: torchvision falls back to a central crop
    top, left, h, w = A.rrc_params(rng, 4, 400, (0.9, 1.0), CFG.ratio)
    assert (h, w) == (4, round(4 * CFG.ratio[1])) and left == (400 - w) // 2 and top == 0


def test_output_sizes_dtypes_and_normalisation():
    img = np.asarray(Image.open("tests/data/wsidicom_test_tile.png").convert("RGB"))
    out = A.multi_crop(img, np.random.default_rng(0), CFG)
    assert out["global_crops"].shape == (2, 224, 224, 3) and out["global_crops"].dtype == np.float32
    assert out["local_crops"].shape == (8, 98, 98, 3) and out["local_crops"].dtype == np.float32
    lo = (0 - np.array(A.IMAGENET_MEAN)) / np.array(A.IMAGENET_STD)
    hi = (1 - np.array(A.IMAGENET_MEAN)) / np.array(A.IMAGENET_STD)
    for x in out.values():
        assert np.all(x >= lo - 1e-5) and np.all(x <= hi + 1e-5)
        assert x.flags.c_contiguous


def test_crop_decisions_fire_at_configured_probability():
    rng = np.random.default_rng(1)
    n = 20000
    plan = A.draw_crop_plan(rng, 64, 64, n, CFG.local_scale, CFG)
    assert _binomial_ok(int(plan.hflip.sum()), n, CFG.hflip_p)
    assert not plan.vflip.any() and not plan.rot90.any()  # pathology options off by default
    cfg = dataclasses.replace(CFG, vflip_p=0.3, rot90=True)
    plan = A.draw_crop_plan(rng, 64, 64, n, CFG.local_scale, cfg)
    assert _binomial_ok(int(plan.vflip.sum()), n, 0.3)
    assert set(np.unique(plan.rot90)) == {0, 1, 2, 3}
    for k in range(4):
        assert _binomial_ok(int((plan.rot90 == k).sum()), n, 0.25)


def test_colour_decisions_fire_at_configured_probability():
    rng = np.random.default_rng(2)
    n = 20000
    cases = {  # view: (blur p, solarize p) -- DINOv2's effective probabilities
        "global1": (CFG.blur_p_global1, 0.0),
        "global2": (CFG.blur_p_global2, CFG.solarize_p_global2),
        "local": (CFG.blur_p_local, 0.0),
    }
    assert (CFG.blur_p_global1, CFG.blur_p_global2, CFG.blur_p_local, CFG.solarize_p_global2) == (0.0, 0.9, 0.5, 0.2)
    for blur_p, sol_p in cases.values():
        plan = A.draw_color_plan(rng, np.full(n, blur_p), np.full(n, sol_p), CFG)
        assert _binomial_ok(int(plan.jitter.sum()), n, CFG.jitter_p)
        assert _binomial_ok(int(plan.gray.sum()), n, CFG.grayscale_p)
        assert _binomial_ok(int((plan.blur_sigma > 0).sum()), n, blur_p)
        assert _binomial_ok(int(plan.solarize.sum()), n, sol_p)
        assert not plan.hed.any()
        s = plan.blur_sigma[plan.blur_sigma > 0]
        if s.size:
            assert s.min() >= CFG.blur_sigma[0] and s.max() <= CFG.blur_sigma[1]
    f = plan.factors
    assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 1].min() >= 0.6 and f[:, 1].max() <= 1.4
    assert f[:, 2].min() >= 0.8 and f[:, 2].max() <= 1.2 and np.abs(f[:, 3]).max() <= 0.1
    # the four jitter ops come in a uniformly random order (torch.randperm): each op first 1/4 of the time
    for op in range(4):
        assert _binomial_ok(int((plan.order[:, 0] == op).sum()), n, 0.25)
    assert np.all(np.sort(plan.order, axis=1) == np.arange(4))


def test_plan_is_applied():
    """Grayscale p=1 gives equal channels; solarize on global 2 only; jitter p=0 leaves colours alone."""
    img = np.asarray(Image.open("tests/data/wsidicom_test_tile.png").convert("RGB"))
    cfg = dataclasses.replace(CFG, jitter_p=0.0, grayscale_p=1.0, blur_p_global2=0.0, blur_p_local=0.0,
                              solarize_p_global2=0.0, global_size=32, local_size=16)
    out = A.multi_crop(img, np.random.default_rng(0), cfg)
    raw = out["global_crops"] * np.array(cfg.std, np.float32) + np.array(cfg.mean, np.float32)
    assert np.abs(raw[..., 0] - raw[..., 1]).max() < 1e-5 and np.abs(raw[..., 1] - raw[..., 2]).max() < 1e-5
    # no colour op at all: a flat-colour image stays exactly that colour after normalisation
    flat = np.full((64, 64, 3), (200, 100, 50), np.uint8)
    cfg = dataclasses.replace(cfg, grayscale_p=0.0)
    out = A.multi_crop(flat, np.random.default_rng(0), cfg)
    want = (np.array([200, 100, 50]) / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    assert np.allclose(out["global_crops"], want, atol=1e-5) and np.allclose(out["local_crops"], want, atol=1e-5)
    cfg = dataclasses.replace(cfg, solarize_p_global2=1.0)
    out = A.multi_crop(flat, np.random.default_rng(0), cfg)
    assert np.allclose(out["global_crops"][0], want, atol=1e-5)
    sol = (np.array([255 - 200, 100, 50]) / 255 - np.array(cfg.mean)) / np.array(cfg.std)  # >= 128 inverted
    assert np.allclose(out["global_crops"][1], sol, atol=1e-5)


def test_deterministic_for_a_seed():
    img = np.asarray(Image.open("tests/data/wsidicom_test_tile.png").convert("RGB"))
    cfg = dataclasses.replace(CFG, global_size=64, local_size=32, num_local_crops=3)
    a = A.multi_crop(img, np.random.default_rng([7, 3]), cfg)
    b = A.multi_crop(img, np.random.default_rng([7, 3]), cfg)
    c = A.multi_crop(img, np.random.default_rng([7, 4]), cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["global_crops"], c["global_crops"])
    assert a["local_crops"].shape == (3, 32, 32, 3)


def test_pathology_options_run():
    img = np.asarray(Image.open("tests/data/wsidicom_test_tile.png").convert("RGB"))
    cfg = dataclasses.replace(CFG, global_size=32, local_size=16, vflip_p=0.5, rot90=True, hed_p=1.0, hed_sigma=0.05)
    out = A.multi_crop(img, np.random.default_rng(0), cfg)
    assert np.isfinite(out["global_crops"]).all() and out["local_crops"].shape == (8, 16, 16, 3)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32) * 0.9 + 0.05
    same = A.hed_jitter(x, np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32))
    assert np.abs(same - x).max() < 1e-4  # identity stain parameters give the image back


def test_colour_ops_match_torchvision_tensor_ops():
    torch = require("torch")
    F = require("torchvision.transforms.functional")
    x = np.random.default_rng(0).random((3, 3, 24, 24), dtype=np.float32)
    x[0, :, :4] = np.round(x[0, :, :4] * 3) / 3  # ties between channels
    t = torch.from_numpy(x)
    f = np.float32(1.3)
    close = lambda a, b: np.abs(a - b.numpy()).max() < 1e-5  # noqa: E731
    assert close(A.adjust_brightness(x, f), F.adjust_brightness(t, 1.3))
    assert close(A.adjust_contrast(x, f), torch.stack([F.adjust_contrast(ti, 1.3) for ti in t]))
    assert close(A.adjust_saturation(x, np.float32(0.7)), F.adjust_saturation(t, 0.7))
    for d in (-0.1, -0.02, 0.05, 0.1):
        assert close(A.adjust_hue(x, np.full(3, d, np.float32)), F.adjust_hue(t, d))
    assert close(A.grayscale(x), F.rgb_to_grayscale(t, 3))
    assert close(A.solarize(x, 0.5), F.solarize(t, 0.5))
    assert close(A.gaussian_blur(x[0], 1.3, 9), F.gaussian_blur(t[0], [9, 9], [1.3, 1.3]))


def test_resize_matches_torchvision_on_pil():
    require("torch")
    F = require("torchvision.transforms.functional")
    img = Image.open("tests/data/wsidicom_test_tile.png").convert("RGB")
    plan = A.CropPlan([(10, 20, 150, 170)], np.array([True]), np.array([False]), np.array([0]))
    ours = A.apply_crop_plan(img, plan, 98)[0]
    ref = np.asarray(F.hflip(F.resized_crop(img, 10, 20, 150, 170, [98, 98], F.InterpolationMode.BICUBIC)))
    assert np.array_equal(ours, ref)


def test_uint8_crops_match_the_float_path():
    """crop dtype uint8: crops no colour op touches are exactly their pixels (normalised: the float path to float
    rounding); touched crops are the float path's values rounded to the nearest grey level."""
    from gpfm_jax.data.normalize import normalize_pixels

    img = np.asarray(Image.open("tests/data/tiatoolbox_target_image.png").convert("RGB"))[:300, :300]
    cfg = dataclasses.replace(CFG, global_size=56, local_size=28)
    worst_untouched, worst, n_untouched = 0.0, 0.0, 0
    for seed in range(40):
        f = A.multi_crop(img, np.random.default_rng(seed), cfg)
        u = A.multi_crop(img, np.random.default_rng(seed), cfg, "uint8")
        rng = np.random.default_rng(seed)  # replay the draws to know which crops were touched
        A.draw_crop_plan(rng, 300, 300, 2, cfg.global_scale, cfg)
        A.draw_crop_plan(rng, 300, 300, cfg.num_local_crops, cfg.local_scale, cfg)
        g_plan = A.draw_color_plan(rng, np.array([cfg.blur_p_global1, cfg.blur_p_global2]),
                                   np.array([0.0, cfg.solarize_p_global2]), cfg)
        l_plan = A.draw_color_plan(rng, np.full(8, cfg.blur_p_local), np.zeros(8), cfg)
        for key, plan in (("global_crops", g_plan), ("local_crops", l_plan)):
            assert u[key].dtype == np.uint8 and u[key].shape == f[key].shape
            diff = np.abs(normalize_pixels(u[key]) - f[key]).max(axis=(1, 2, 3))
            touched = A.touched(plan)
            n_untouched += int((~touched).sum())
            worst_untouched = max(worst_untouched, float(diff[~touched].max(initial=0)))
            worst = max(worst, float(diff.max()))
    assert n_untouched > 20 and worst_untouched < 2e-6
    assert 0.008 < worst <= 0.5 / 255 / min(CFG.std) + 2e-6  # 0.00875: half a grey level / 0.224


def test_device_normalisation():
    import jax.numpy as jnp

    from gpfm_jax.data.normalize import input_dtype, normalize_batch, normalize_pixels

    x = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    want = (x / 255.0 - np.array(A.IMAGENET_MEAN)) / np.array(A.IMAGENET_STD)
    out = normalize_batch({"global_crops": jnp.asarray(x), "local_crops": jnp.asarray(x[:, :1]),
                           "masks": jnp.ones((2, 2), bool)}, "bfloat16", "float32")
    assert out["global_crops"].dtype == jnp.float32 and out["masks"].dtype == jnp.bool_
    assert np.abs(np.asarray(out["global_crops"]) - want).max() < 1e-6
    assert np.abs(normalize_pixels(x) - want).max() < 1e-6
    bf = normalize_batch({"global_crops": jnp.asarray(x)}, "bfloat16")["global_crops"]
    assert bf.dtype == jnp.bfloat16 and np.abs(np.asarray(bf, np.float32) - want).max() < 0.02
    floats = np.float32(want)  # already normalised (the float32 path): only cast
    assert np.array_equal(np.asarray(normalize_batch({"global_crops": jnp.asarray(floats)})["global_crops"]), floats)
    assert input_dtype("bfloat16", "float16") == jnp.float32 and input_dtype("bfloat16") == jnp.bfloat16
