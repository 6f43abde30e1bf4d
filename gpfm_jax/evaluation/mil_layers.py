"""What every MIL head shares: the model config (`MILConfig`, the model names), the masked softmax over a bag's
tiles, the cheap dropout masks and CLAM's `fc` projection.

They live below both `mil_models` (ABMIL, mean pooling, `build_model`) and `transmil` (TransMIL), so neither of those
imports the other's module to get them: the layering is mil_layers < transmil < mil_models, with no cycle.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

MODELS = ("abmil", "transmil", "mean")


@dataclasses.dataclass(frozen=True)
class MILConfig:
    """Defaults are CLAM_SB 'small' (1024 -> 512 -> 256) and TransMIL's paper settings."""

    model: str = "abmil"
    num_outputs: int = 2  # classes, survival bins, or 1 (Cox log-hazard)
    hidden_dim: int | None = 512  # fc: Linear + ReLU before pooling (CLAM); None = no projection (torchmil's default)
    attention_dim: int = 256  # ABMIL attention width
    gated: bool = True  # Attn_Net_Gated (tanh * sigmoid) vs Attn_Net (tanh)
    attention_bias: bool = True  # CLAM's attention_c has a bias; softmax ignores it (torchmil has none)
    dropout: float = 0.25  # CLAM: after fc and in both attention branches; TransMIL: after fc
    attention_dropout: float | None = None  # ABMIL attention branches; None = `dropout` (CLAM), 0 = torchmil
    # TransMIL
    heads: int = 8
    landmarks: int | None = None  # None = dim // 2
    pinv_iterations: int = 6
    residual_conv_kernel: int = 33  # 0 = none (torchmil); the paper's lucidrains NystromAttention uses 33
    attn_out_proj: bool = True  # Linear after the heads (paper); torchmil has none when widths agree
    fc_relu: bool = True  # paper: Linear + ReLU; torchmil: Linear only
    attn_dropout: float = 0.1  # TransMIL paper: dropout on the attention output
    num_layers: int = 2

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to mask; a bag with no real tile gets all zeros (not NaN)."""
    neg = jnp.finfo(scores.dtype).min
    s = jnp.where(mask, scores, neg)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.where(mask, w, 0.0)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep: float) -> tuple[jax.Array, float]:
    """Bernoulli(keep) mask from packed random bits, and the exact keep probability it has.

    Threefry costs ~15-20 ns per 32-bit draw on this CPU, which made flax's Dropout half of an ABMIL training step
    (a mask per tile x width); here each 32-bit draw gives 4 byte-sized uniforms (keep probability a multiple of
    1/256: exact for CLAM's 0.25) or 2 16-bit ones (otherwise, within 1/65536), 4x / 2x fewer draws."""
    n = math.prod(shape)
    per = 4 if abs(keep * 256 - round(keep * 256)) < 1e-9 else 2
    dtype, levels = (jnp.uint8, 256) if per == 4 else (jnp.uint16, 65536)
    threshold = int(round(keep * levels))
    words = jax.random.bits(key, (-(-n // per),), jnp.uint32)
    u = jax.lax.bitcast_convert_type(words, dtype).reshape(-1)[:n].reshape(shape)
    return u < jnp.asarray(threshold, dtype) if threshold < levels else jnp.ones(shape, bool), threshold / levels


class Dropout(nn.Module):
    """Inverted dropout with `keep_mask`'s cheap masks (same semantics as nn.Dropout, rng stream 'dropout')."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        mask, keep = keep_mask(self.make_rng("dropout"), x.shape, 1.0 - self.rate)
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Projection(nn.Module):
    """CLAM's `fc`: Linear + ReLU + Dropout (skipped when hidden_dim is None)."""

    hidden_dim: int | None
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.hidden_dim is None:
            return x
        h = nn.relu(nn.Dense(self.hidden_dim, name="fc")(x))
        return Dropout(self.dropout, deterministic=not train)(h)
