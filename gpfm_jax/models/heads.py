"""Projection heads of GPFM: the shared DINO/iBOT head and one distillation head per expert teacher.

Both are DINOv2 `DINOHead`s: an MLP, L2 normalisation, then a weight-normalised linear layer without bias
(PyTorch `weight_norm`: W = g * v / ||v||, one norm per output unit). Parameter names mirror the PyTorch keys so a
checkpoint maps mechanically:

  dino_head.mlp.{0,2,4}.weight/bias   <->  mlp_{0,2,4}/kernel (transposed) / bias
  dino_head.last_layer.weight_g (K,1) <->  last_layer/weight_g (K,)        (reshape)
  dino_head.last_layer.weight_v (K,d) <->  last_layer/weight_v (d, K)      (transposed, like a Dense kernel)
  distill_heads.<t>.mlp.weight/bias   <->  mlp/kernel / bias               (DINOHead with nlayers=1)

Logical axis names (for the sharding rules): "embed" (backbone width), "head_hidden", "head_hidden_out",
"head_bottleneck", "prototypes" (DINO output), "teacher_embed" (distillation output).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

TRUNC_NORMAL = nn.initializers.truncated_normal(stddev=0.02)
# torch nn.Linear default weight init, U(+-1/sqrt(fan_in)); DINOv2 creates last_layer after its trunc-normal
# init pass, so weight_v keeps this default. fan_in is axis 0 of the (in, out) kernel layout.
TORCH_LINEAR_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch F.normalize: x / max(||x||, eps), computed in float32 so bf16 activations keep unit norm."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


class WeightNormDense(nn.Module):
    """Linear layer without bias, W = g * v / ||v|| per output unit (torch `weight_norm(nn.Linear, dim=0)`)."""

    features: int
    in_axis_name: str = "head_bottleneck"
    out_axis_name: str = "prototypes"
    g_init_value: float = 1.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.param(
            "weight_v",
            nn.with_logical_partitioning(TORCH_LINEAR_DEFAULT, (self.in_axis_name, self.out_axis_name)),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        g = self.param(
            "weight_g",
            nn.with_logical_partitioning(
                lambda k, s, d: jnp.full(s, self.g_init_value, d), (self.out_axis_name,)
            ),
            (self.features,),
            self.param_dtype,
        )
        v32 = v.astype(jnp.float32)
        kernel = v32 * (g.astype(jnp.float32) / jnp.sqrt(jnp.sum(v32 * v32, axis=0)))
        return x.astype(self.dtype) @ kernel.astype(self.dtype)


def _dense(features: int, names: tuple[str, str], dtype: str, param_dtype: str, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(TRUNC_NORMAL, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


class DINOHead(nn.Module):
    """x [..., in] -> logits [..., out_dim]; shared by the DINO (CLS) and iBOT (masked patch) objectives.

    nlayers=3: Linear(in, hidden) -> GELU -> Linear(hidden, hidden) -> GELU -> Linear(hidden, bottleneck), named
    mlp_0, mlp_2, mlp_4 after the torch Sequential indices; nlayers=1: a single Linear named `mlp`.
    `return_bottleneck` also returns the L2-normalised bottleneck (useful for diagnostics).
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    gelu_approximate: bool = False  # torch nn.GELU() is the exact erf GELU
    out_axis_name: str = "prototypes"
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {self.nlayers}")
        if self.nlayers == 1:
            x = _dense(self.bottleneck_dim, ("embed", "head_bottleneck"), self.dtype, self.param_dtype, "mlp")(x)
        else:
            names = [("embed", "head_hidden")]
            names += [("head_hidden", "head_hidden_out") if i % 2 == 0 else ("head_hidden_out", "head_hidden")
                      for i in range(self.nlayers - 2)]
            for i, axes in enumerate(names):
                x = _dense(self.hidden_dim, axes, self.dtype, self.param_dtype, f"mlp_{2 * i}")(x)
                x = nn.gelu(x, approximate=self.gelu_approximate)
            last_in = names[-1][1]
            x = _dense(self.bottleneck_dim, (last_in, "head_bottleneck"), self.dtype, self.param_dtype,
                       f"mlp_{2 * (self.nlayers - 1)}")(x)
        x = l2_normalize(x)
        return WeightNormDense(
            self.out_dim,
            out_axis_name=self.out_axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="last_layer",
        )(x)


def distill_head(out_dim: int, bottleneck_dim: int = 256, dtype: str = "float32",
                 param_dtype: str = "float32", name: str | None = None) -> DINOHead:
    """Distillation head for one expert teacher: Linear(in, 256) -> L2 -> weight-normalised Linear(256, D_t).

    GPFM builds it as a DINOHead with nlayers=1, so it shares the init and the param layout.
    """
    return DINOHead(out_dim=out_dim, bottleneck_dim=bottleneck_dim, nlayers=1, out_axis_name="teacher_embed",
                    dtype=dtype, param_dtype=param_dtype, name=name)


class DistillHeads(nn.Module):
    """One distillation head per teacher: {name: D_t} -> {name: head(x)}; the same head maps CLS and patches."""

    teacher_dims: dict[str, int]
    bottleneck_dim: int = 256
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, teachers: tuple[str, ...] | None = None) -> dict[str, jax.Array]:
        names = tuple(self.teacher_dims) if teachers is None else teachers
        heads = {t: distill_head(d, self.bottleneck_dim, self.dtype, self.param_dtype, name=t)
                 for t, d in self.teacher_dims.items()}
        return {t: heads[t](x) for t in names}
