"""Slide-level MIL heads in Flax: gated attention MIL (Ilse et al. 2018, laid out as CLAM's `CLAM_SB` attention
branch `Attn_Net_Gated`), mean pooling, and `build_model`, which also builds TransMIL (`transmil.py`).

Every model maps a batch of padded bags to slide logits and one attention score per tile:

    logits, attention = model.apply({"params": p}, x, mask, train=False)   # x f32[B, N, D], mask bool[B, N]
    logits f32[B, C]; attention f32[B, N] (softmax weights over each bag's real tiles; 0 on padding)

Padding never changes a result: masked tiles get no attention weight and are left out of every sum, so a bag gives
the same logits in any bucket size (tested). Parameter names follow CLAM (`fc`, `attention_a`, `attention_b`,
`attention_c`, `classifier`; Flax kernels are the transposed torch weights), so CLAM / torchmil weights transfer by
renaming.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# The shared pieces are defined in mil_layers (below this module and transmil) and re-exported here, where callers
# have always found them.
from gpfm_jax.evaluation.mil_layers import MODELS, Dropout, MILConfig, Projection, keep_mask, masked_softmax
from gpfm_jax.evaluation.transmil import TransMIL

__all__ = ["ABMIL", "MODELS", "Dropout", "MILConfig", "MeanMIL", "Projection", "TransMIL", "build_model", "keep_mask",
           "masked_softmax"]


class ABMIL(nn.Module):
    """Gated attention MIL. a_i = w^T (tanh(V h_i) * sigmoid(U h_i)) (+ b), weights softmax(a) over the bag's tiles,
    slide vector z = sum_i w_i h_i, logits = classifier(z). Single attention branch (CLAM_SB); CLAM's instance
    clustering loss is not part of ABMIL and is not implemented."""

    cfg: MILConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        c = self.cfg
        h = Projection(c.hidden_dim, c.dropout, name="proj")(x, train)
        rate = c.dropout if c.attention_dropout is None else c.attention_dropout
        drop = Dropout(rate, deterministic=not train)
        a = drop(jnp.tanh(nn.Dense(c.attention_dim, name="attention_a")(h)))
        if c.gated:
            a = a * drop(nn.sigmoid(nn.Dense(c.attention_dim, name="attention_b")(h)))
        scores = nn.Dense(1, use_bias=c.attention_bias, name="attention_c")(a)[..., 0]  # [B, N]
        w = masked_softmax(scores, mask)
        z = jnp.einsum("bn,bnd->bd", w, h)
        return nn.Dense(c.num_outputs, name="classifier")(z), w


class MeanMIL(nn.Module):
    """Baseline: the mean of the (projected) tile features, then a linear classifier; attention = uniform weights."""

    cfg: MILConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        h = Projection(self.cfg.hidden_dim, self.cfg.dropout, name="proj")(x, train)
        w = mask / jnp.maximum(mask.sum(-1, keepdims=True), 1)
        z = jnp.einsum("bn,bnd->bd", w.astype(h.dtype), h)
        return nn.Dense(self.cfg.num_outputs, name="classifier")(z), w.astype(h.dtype)


def build_model(cfg: MILConfig) -> nn.Module:
    if cfg.model == "abmil":
        return ABMIL(cfg)
    if cfg.model == "mean":
        return MeanMIL(cfg)
    return TransMIL(cfg)
