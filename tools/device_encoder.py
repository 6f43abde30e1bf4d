"""tools/device_check.py's encoder sections (issue 11): gpfm_jax's ViT-L/14 encoder against timm's
`vit_large_patch14_dinov2` with the same weights: extraction throughput (bf16) and feature agreement (bf16 vs fp32,
JAX vs timm on real H&E tiles)."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tools.device_common import REPO, median_time

TIMM_ARCH = "vit_large_patch14_dinov2"
TINY_VIT = dict(img_size=56, embed_dim=64, depth=2, num_heads=4)


def _timm_model(tiny: bool):
    import timm
    import torch

    torch.manual_seed(0)
    kwargs = dict(img_size=224, init_values=1e-5, num_classes=0)
    if tiny:
        kwargs.update(TINY_VIT)
    model = timm.create_model(TIMM_ARCH, **kwargs)
    with torch.no_grad():  # non-trivial LayerScales, so every block matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _jax_encoder(model_t, tiny: bool, dtype: str):
    from gpfm_jax.convert.torch_io import tensor_to_numpy
    from gpfm_jax.convert.vit_keys import canonical_keys, vit_params_from_torch
    from gpfm_jax.data.normalize import normalize_pixels
    from gpfm_jax.models.vit import ViTConfig, VisionTransformer

    state, _ = canonical_keys({k: tensor_to_numpy(v) for k, v in model_t.state_dict().items()}, "timm")
    cfg = ViTConfig(**(TINY_VIT if tiny else {}), dtype=dtype)
    params = jax.device_put(vit_params_from_torch(state, cfg, "timm"))
    module = VisionTransformer(cfg)

    @jax.jit
    def forward(p, tiles_uint8):  # what gpfm-extract runs: uint8 in, normalisation on device (ImageNet mean/std)
        x = normalize_pixels(tiles_uint8, xp=jnp)
        return module.apply({"params": p}, x.astype(dtype))["cls"].astype(jnp.float32)

    return lambda tiles: forward(params, tiles), cfg.img_size


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extraction_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    dev = _torch_device()
    model_t = _timm_model(args.tiny)
    jax_fn, size = _jax_encoder(model_t, args.tiny, "bfloat16")
    model_t = model_t.to(dev)
    batch = 4 if args.tiny else args.extract_batch
    tiles = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    tiles_dev = jax.device_put(tiles, devices[0])
    mean = torch.tensor((0.485, 0.456, 0.406), device=dev).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=dev).view(1, 3, 1, 1)
    tiles_t = torch.from_numpy(tiles).to(dev)

    def run_timm():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            x = (tiles_t.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            out = model_t(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    def run_jax():
        return jax.block_until_ready(jax_fn(tiles_dev))

    run_jax(), run_timm()  # compile / first-call costs
    rounds = 2 if args.tiny else 5
    t_jax, t_timm = [], []
    for _ in range(rounds):  # interleaved, so machine noise hits both
        t_jax.append(median_time(run_jax, 1 if args.tiny else 5))
        t_timm.append(median_time(run_timm, 1 if args.tiny else 5))
    jax_tps, timm_tps = batch / statistics.median(t_jax), batch / statistics.median(t_timm)
    return {"model": TIMM_ARCH + (" (tiny)" if args.tiny else ""), "batch": batch, "dtype": "bfloat16",
            "jax_tiles_per_s": jax_tps, "timm_tiles_per_s": timm_tps, "jax_over_timm": jax_tps / timm_tps}


def _real_tiles(size: int, count: int) -> np.ndarray:
    from PIL import Image

    big = np.asarray(Image.open(REPO / "tests" / "data" / "tiatoolbox_target_image.png").convert("RGB"))
    crops = [big[y: y + 250, x: x + 250] for y in range(0, 750, 250) for x in range(0, 750, 250)][:count]
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in crops])


def features_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    dev = _torch_device()
    model_t = _timm_model(args.tiny)
    f32_fn, size = _jax_encoder(model_t, args.tiny, "float32")
    bf16_fn, _ = _jax_encoder(model_t, args.tiny, "bfloat16")
    tiles = _real_tiles(size, 9)
    with jax.default_matmul_precision("highest"):
        f32 = np.asarray(f32_fn(tiles))
    bf16 = np.asarray(bf16_fn(tiles))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        x = torch.from_numpy(tiles).to(dev).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor((0.485, 0.456, 0.406), device=dev).view(1, 3, 1, 1)) / torch.tensor(
            (0.229, 0.224, 0.225), device=dev).view(1, 3, 1, 1)
        ref = model_t.to(dev)(x).float().cpu().numpy()

    def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        rel = np.max(np.abs(a - b), -1) / np.linalg.norm(b, axis=-1)
        return {"min_cosine": float(cos.min()), "max_abs_diff_over_norm": float(rel.max())}

    return {"tiles": len(tiles), "feature_dim": int(f32.shape[1]), "bf16_vs_fp32": compare(bf16, f32),
            "jax_fp32_vs_timm_fp32": compare(f32, ref)}
