#!/usr/bin/env python
"""ViT-L/14 forward throughput: gpfm_jax (XLA) vs timm (PyTorch) on this machine, same weights, same run.

    python tools/bench_encoder.py [--batch 8] [--size 224] [--repeats 3] [--attention-impl auto]
                                  [--compare-attention xla] [--fp32-only]

Runs are interleaved (JAX, timm, JAX, timm, ...) so that machine noise hits both sides alike; the median of each side
is reported as images/s, with the JAX/timm ratio, in fp32 and in each side's low-precision mode
(JAX: bf16 compute with fp32 params; timm: torch.autocast(bfloat16)). `--compare-attention IMPL` adds a second JAX
variant with ViTConfig(attention_impl=IMPL) to the same interleaved loop (before/after of an attention change).
No XLA flags are set here: the numbers are JAX's defaults.
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


def _jax_forward(model_t, dtype: str, size: int, attention_impl: str = "auto"):
    from gpfm_jax.convert.torch_io import tensor_to_numpy
    from gpfm_jax.convert.vit_keys import canonical_keys, vit_params_from_torch
    from gpfm_jax.models.vit import ViTConfig, VisionTransformer

    state, _ = canonical_keys({k: tensor_to_numpy(v) for k, v in model_t.state_dict().items()}, "timm")
    cfg = ViTConfig(dtype=dtype, attention_impl=attention_impl)
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
    parser.add_argument("--attention-impl", default="auto", help="ViTConfig.attention_impl of the JAX model")
    parser.add_argument("--compare-attention", default=None, help="also time JAX with this attention_impl")
    parser.add_argument("--fp32-only", action="store_true", help="skip the bf16 rows (timm bf16 is slow on CPU)")
    args = parser.parse_args()

    import torch

    model_t = _timm_model()
    x_np = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); ViT-L/14, batch {args.batch} at {args.size}")
    modes = (("fp32", "float32", False), ("low precision (bf16)", "bfloat16", True))
    for label, jax_dtype, autocast in modes[:1] if args.fp32_only else modes:
        variants = {f"gpfm_jax[{args.attention_impl}]": _jax_forward(model_t, jax_dtype, args.size, args.attention_impl)}
        if args.compare_attention:
            variants[f"gpfm_jax[{args.compare_attention}]"] = _jax_forward(
                model_t, jax_dtype, args.size, args.compare_attention
            )
        timm_fn = _timm_forward(model_t, autocast)
        for fn in variants.values():
            fn(x_jax)  # compile / warm up
        timm_fn(x_torch)
        times: dict[str, list[float]] = {name: [] for name in variants} | {"timm": []}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(_timed(fn, x_jax))
            times["timm"].append(_timed(timm_fn, x_torch))
        timm_ips = args.batch / statistics.median(times["timm"])
        for name in variants:
            ips = args.batch / statistics.median(times[name])
            print(f"{label:>22}: {name} {ips:6.2f} img/s | timm {timm_ips:6.2f} img/s | ratio {ips / timm_ips:.2f}")

if __name__ == "__main__":
    main()
