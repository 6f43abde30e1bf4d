#!/usr/bin/env python
"""ViT-L/14 forward throughput: gpfm_jax (XLA) vs timm (PyTorch) on this machine, same weights, same run.

    python tools/bench_encoder.py [--batch 8] [--size 224] [--repeats 3]

Runs are interleaved (JAX, timm, JAX, timm, ...) so that machine noise hits both sides alike; the median of each side
is reported as images/s, with the JAX/timm ratio, in fp32 and in each side's low-precision mode
(JAX: bf16 compute with fp32 params; timm: torch.autocast(bfloat16)).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _timm_model():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("vit_large_patch14_dinov2", img_size=224, init_values=1e-5, num_classes=0).eval()


def _jax_forward(model_t, dtype: str, size: int):
    from gpfm_jax.convert.torch_io import tensor_to_numpy
    from gpfm_jax.convert.vit_keys import canonical_keys, vit_params_from_torch
    from gpfm_jax.models.vit import ViTConfig, VisionTransformer

    state, _ = canonical_keys({k: tensor_to_numpy(v) for k, v in model_t.state_dict().items()}, "timm")
    cfg = ViTConfig(dtype=dtype)
    params = jax.device_put(vit_params_from_torch(state, cfg, "timm"))
    module = VisionTransformer(cfg)
    fwd = jax.jit(lambda p, x: module.apply({"params": p}, x)["cls"])
    return lambda x: fwd(params, x).block_until_ready()


def _timm_forward(model_t, autocast: bool):
    import torch

    def run(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model_t.forward_features(x)

    return run


def _timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    model_t = _timm_model()
    x_np = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); ViT-L/14, batch {args.batch} at {args.size}")
    for label, jax_dtype, autocast in (("fp32", "float32", False), ("low precision (bf16)", "bfloat16", True)):
        jax_fn, timm_fn = _jax_forward(model_t, jax_dtype, args.size), _timm_forward(model_t, autocast)
        jax_fn(x_jax), timm_fn(x_torch)  # compile / warm up
        jax_times, timm_times = [], []
        for _ in range(args.repeats):
            jax_times.append(_timed(jax_fn, x_jax))
            timm_times.append(_timed(timm_fn, x_torch))
        jax_ips = args.batch / statistics.median(jax_times)
        timm_ips = args.batch / statistics.median(timm_times)
        print(f"{label:>22}: gpfm_jax {jax_ips:6.2f} img/s | timm {timm_ips:6.2f} img/s | ratio {jax_ips / timm_ips:.2f}")


if __name__ == "__main__":
    main()
