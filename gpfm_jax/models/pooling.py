"""Attentional pooling over ViT tokens (CoCa / CONCH), and a ViT followed by such a pooler.

CONCH's image embedding (conch-fork `VisualModel.forward` with `attentional_pool_contrast`) is
    tokens  = trunk.forward_features(x)                 # ALL tokens (CLS + patches), after the trunk's final norm
    pooled  = ln_contrast(AttentionalPooler(tokens)[:, 0])
    latent  = pooled @ proj_contrast                    # plain matmul, proj_contrast is (in, out)
    encode_image(x) = F.normalize(latent, dim=-1)       # CoCa._encode_image, normalize=True by default
with `AttentionalPooler`: q = ln_q(query) (learned, n_queries x d), context = ln_k(tokens), then
`nn.MultiheadAttention(d, heads, kdim=context_dim, vdim=context_dim)` (separate q/k/v projections with biases,
softmax(q k^T / sqrt(d / heads)) v per head, out_proj). All pooler LayerNorms are torch defaults (eps 1e-5).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpfm_jax.models.vit import TRUNC_NORMAL, JsonConfig, ViTConfig, VisionTransformer


@dataclasses.dataclass(frozen=True)
class PoolerConfig(JsonConfig):
    """Architecture of an attentional pooler + post-norm + projection. JSON-serialisable (bundle meta)."""

    dim: int = 512  # d_model: query width and attention output width
    context_dim: int = 768  # width of the tokens attended over (kdim = vdim)
    num_heads: int = 8
    num_queries: int = 1
    ln_eps: float = 1e-5  # ln_q, ln_k and the post-pool LayerNorm (torch default)
    proj_dim: int | None = 512  # output width of `pooled @ proj`; None: no projection

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"pooler dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")

    @property
    def out_dim(self) -> int:
        return self.proj_dim if self.proj_dim is not None else self.dim



def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch F.normalize(x, dim=-1): x / max(||x||, eps), computed in f32."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def _layer_norm(eps: float, dtype: str, param_dtype: str, name: str) -> nn.LayerNorm:
    # Two-pass variance (as torch) rather than E[x^2] - E[x]^2: the pooler sees unscaled token values.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


def _dense(features: int, dtype: str, param_dtype: str, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=True, dtype=dtype, param_dtype=param_dtype, kernel_init=TRUNC_NORMAL, name=name)


class AttentionalPooler(nn.Module):
    """tokens [B, N, context_dim] -> [B, num_queries, dim] (conch-fork / open_clip `AttentionalPooler`)."""

    cfg: PoolerConfig
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        if tokens.ndim != 3 or tokens.shape[-1] != cfg.context_dim:
            raise ValueError(f"pooler expects tokens [B, N, {cfg.context_dim}], got {tokens.shape}")
        b, n, _ = tokens.shape
        head_dim = cfg.dim // cfg.num_heads
        query = self.param("query", nn.initializers.normal(1.0), (cfg.num_queries, cfg.dim), self.param_dtype)
        context = _layer_norm(cfg.ln_eps, self.dtype, self.param_dtype, "ln_k")(tokens)
        q = _layer_norm(cfg.ln_eps, self.dtype, self.param_dtype, "ln_q")(query)
        q = _dense(cfg.dim, self.dtype, self.param_dtype, "q_proj")(q)  # [Q, dim], shared by the batch
        k = _dense(cfg.dim, self.dtype, self.param_dtype, "k_proj")(context)
        v = _dense(cfg.dim, self.dtype, self.param_dtype, "v_proj")(context)
        q = jnp.broadcast_to(q.reshape(1, cfg.num_queries, cfg.num_heads, head_dim), (b, cfg.num_queries, cfg.num_heads, head_dim))
        k = k.reshape(b, n, cfg.num_heads, head_dim)
        v = v.reshape(b, n, cfg.num_heads, head_dim)
        out = jax.nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        out = out.reshape(b, cfg.num_queries, cfg.dim)
        return _dense(cfg.dim, self.dtype, self.param_dtype, "out_proj")(out)


class AttentionalPoolHead(nn.Module):
    """tokens -> {"pooled": LN(pooler(tokens)[:, 0]) [B, dim], "projected": pooled @ proj [B, proj_dim]}."""

    cfg: PoolerConfig
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
        cfg = self.cfg
        pooled = AttentionalPooler(cfg, self.dtype, self.param_dtype, name="attn_pool")(tokens)[:, 0]
        pooled = _layer_norm(cfg.ln_eps, self.dtype, self.param_dtype, "ln_post")(pooled)
        out = {"pooled": pooled}
        if cfg.proj_dim is not None:
            proj = self.param(
                "proj", nn.initializers.normal(cfg.dim**-0.5), (cfg.dim, cfg.proj_dim), self.param_dtype
            )
            out["projected"] = pooled @ proj.astype(pooled.dtype)
        return out


class PooledViT(nn.Module):
    """The ViT trunk (the one `VisionTransformer`, configured) followed by an attentional pool head over ALL its
    final-normed tokens (CLS included). Params: {"trunk": ViT params, "pooler": head params}.

    Outputs: the trunk's {"cls", "patch", "registers", "tokens"} plus "pooled" (LN'd pooler output; CONCH's
    `encode_image(proj_contrast=False, normalize=False)`), "projected" (pooled @ proj) and "image_embedding"
    (L2-normalised "projected"; CONCH's `encode_image()` default, the GPFM distillation target).
    """

    vit: ViTConfig
    pooler: PoolerConfig

    @nn.compact
    def __call__(self, images: jax.Array, masks: jax.Array | None = None, train: bool = False) -> dict[str, jax.Array]:
        if self.pooler.context_dim != self.vit.embed_dim:
            raise ValueError(f"pooler context_dim {self.pooler.context_dim} != trunk width {self.vit.embed_dim}")
        out = dict(VisionTransformer(self.vit, name="trunk")(images, masks, train))
        head = AttentionalPoolHead(self.pooler, self.vit.dtype, self.vit.param_dtype, name="pooler")
        out.update(head(out["tokens"]))
        if "projected" in out:
            out["image_embedding"] = l2_normalize(out["projected"])
        return out
