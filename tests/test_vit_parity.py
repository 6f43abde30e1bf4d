"""The student ViT is the same function as timm's vit_large_patch14_dinov2 (and DINOv2's token preparation).

Reference: timm with random weights, saved as users have it (a bare state dict .pth), converted with the real tool.
Inputs: real H&E tiles from tests/data. Tolerance: max abs error <= 1e-4 in fp32 (relative error printed).

The model is ViT-L/14 DINOv2 (width 1024, 16 heads, patch 14, LayerScale, 224 grid) with 12 of its 24 blocks: every
block is the same code, so the function is checked as well at half the cost, and the block indices run to two
digits, so blocks taken in the order of their names as text ("blocks.10" before "blocks.2") would show. The released
24-block layout (key names, shapes, strict loading into timm) is test_convert's, on the full ViT-L (conftest `vitl`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import normalised_batch, require, timm_vitl
from gpfm_jax.encoders import load_encoder

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

timm = require("timm")
ATOL = 1e-4
DEPTH = 12


@pytest.fixture(scope="module")
def vitl(tmp_path_factory):
    """vit_large_patch14_dinov2 with DEPTH blocks (conftest.timm_vitl)."""
    return timm_vitl(tmp_path_factory.mktemp("vitl_blocks"), depth=DEPTH)


def _report(name: str, ours: np.ndarray, ref: np.ndarray) -> float:
    err = float(np.max(np.abs(ours - ref)))
    rel = err / float(np.max(np.abs(ref)))
    print(f"{name}: max abs err {err:.2e}, relative to max |ref| {rel:.2e}")
    return err


def _torch_reference(model, images_nhwc: np.ndarray, masks: np.ndarray | None, mask_token: torch.Tensor) -> np.ndarray:
    """DINOv2's prepare_tokens_with_masks written out on timm's modules: the mask token replaces patch embeddings
    before the pos-embed is added; pos-embed resampled with F.interpolate(scale_factor=(g + 0.1) / M, bicubic)."""
    x_img = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    b, _, h, w = x_img.shape
    with torch.no_grad():
        x = model.patch_embed.proj(x_img).flatten(2).transpose(1, 2)
        if masks is not None:
            x = torch.where(torch.from_numpy(masks)[..., None], mask_token.to(x.dtype)[None], x)
        x = torch.cat([model.cls_token.expand(b, -1, -1), x], dim=1)
        pos = model.pos_embed
        n = pos.shape[1] - 1
        gh, gw = h // 14, w // 14
        if not (gh * gw == n and gh == gw):
            m = int(math.sqrt(n))
            patch_pos = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(
                patch_pos, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", antialias=False
            )
            assert patch_pos.shape[-2:] == (gh, gw)
            pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
        x = x + pos
        for blk in model.blocks:
            x = blk(x)
        return model.norm(x).numpy()


def test_vitl_matches_timm_at_224_on_real_tiles(vitl, cache_dir):
    model, bundle, _ = vitl
    images = normalised_batch(224, count=3)
    module, params, meta = load_encoder(bundle)
    assert meta["vit"]["embed_dim"] == 1024 and meta["vit"]["num_heads"] == 16 and meta["vit"]["depth"] == DEPTH
    ours = jax.jit(module.apply)({"params": params}, images)
    with torch.no_grad():
        ref = model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert ref.shape == (3, 257, 1024)
    assert _report("cls", np.asarray(ours["cls"]), ref[:, 0]) <= ATOL
    assert _report("patch", np.asarray(ours["patch"]), ref[:, 1:]) <= ATOL


def test_vitl_non_square_input_with_mask_matches_dinov2_rule(vitl):
    model, bundle, _ = vitl
    images = normalised_batch(280, 336, count=2)
    rng = np.random.default_rng(0)
    masks = rng.random((2, 20 * 24)) < 0.4
    module, params, _ = load_encoder(bundle)
    # A trained mask token is not zero: give it values so that masking is visible in the output.
    mask_token = rng.normal(size=(1, 1024)).astype(np.float32)
    params = {**params, "mask_token": mask_token}
    apply = jax.jit(module.apply)
    ours = apply({"params": params}, images, masks)
    ref = _torch_reference(model, images, masks, torch.from_numpy(mask_token))
    assert _report("cls 280x336 masked", np.asarray(ours["cls"]), ref[:, 0]) <= ATOL
    assert _report("patch 280x336 masked", np.asarray(ours["patch"]), ref[:, 1:]) <= ATOL
    # No patch masked is the unmasked function (where(mask, token, x) = x), through the program compiled above.
    unmasked = apply({"params": params}, images, np.zeros_like(masks))
    assert np.max(np.abs(np.asarray(unmasked["patch"]) - ref[:, 1:])) > 1e-2, "mask had no effect"


def test_scanned_layout_is_the_same_function(vitl, cache_dir):
    _, bundle, _ = vitl
    images = normalised_batch(224, count=3)  # the shapes of the 224 parity test: its unscanned program is a cache hit
    module, params, _ = load_encoder(bundle)
    scanned_module, scanned_params, _ = load_encoder(bundle, scan_layers=True, remat_policy="full")
    assert scanned_params["blocks"]["attn"]["qkv"]["kernel"].shape == (DEPTH, 1024, 3072)
    ours = jax.jit(module.apply)({"params": params}, images)
    scanned = jax.jit(scanned_module.apply)({"params": scanned_params}, images)
    np.testing.assert_allclose(np.asarray(scanned["cls"]), np.asarray(ours["cls"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(scanned["patch"]), np.asarray(ours["patch"]), atol=1e-5, rtol=0)
