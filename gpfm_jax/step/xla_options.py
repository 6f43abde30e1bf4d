"""XLA compiler options the training step is compiled with, per platform (gpfm-train and gpfm-plan use the same).

GPU: `xla_gpu_enable_triton_gemm=False`. With XLA's defaults (jax 0.10.2) the H100 compile of the official step
fails in the Triton GEMM emitter on CONCH's trunk attention projection, bf16[37824,768] at 96 images per device:
"INTERNAL: Couldn't find output tile sizes that satisfy hlo" (compiled without a GPU, so without autotuning; a real
GPU's autotuner may pick other tiles). With the option the GEMMs go to cuBLAS; NVIDIA's JAX-Toolbox / MaxText GPU
guides recommend the same option for transformer training on Hopper. Before / after: docs/plan.md.
"""

from __future__ import annotations

from typing import Any

OPTIONS: dict[str, dict[str, Any]] = {
    "gpu": {"xla_gpu_enable_triton_gemm": False},
}


def compiler_options(platform: str) -> dict[str, Any]:
    """Options for `jax.jit(..., compiler_options=...)` on devices of this platform ("gpu", "tpu", "cpu")."""
    return dict(OPTIONS.get(platform, {}))
