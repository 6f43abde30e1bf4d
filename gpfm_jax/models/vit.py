"""Vision Transformer in DINOv2 layout: the GPFM student, and (configured) the UNI, Phikon and CONCH trunks.

Parameter names follow timm (`patch_embed/proj`, `blocks_{i}/attn/qkv`, `ls1`, `mlp/fc1`, `norm`) so that weight
conversion is a mechanical rename + transpose. With `scan_layers=True` the blocks live under one `blocks` scope with a
leading layer axis (compile time independent of depth); `gpfm_jax.convert.layout` converts between the two layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpfm_jax.models import attention, crops, remat
from gpfm_jax.models.drop_path import add_residuals, batch_shards
# re-exported: callers and tests import the drop path helpers from here
from gpfm_jax.models.drop_path import add_residual, drop_path_mode, group_keys  # noqa: F401
from gpfm_jax.models.pos_embed import needs_resampling, resample_patch_pos_embed

DROP_PATH_MODES = ("auto", "sample", "subset")
FFN_TYPES = ("mlp", "swiglu")
ATTENTION_IMPLS = attention.IMPLS


class JsonConfig:
    """replace / to_dict / from_dict for the frozen config dataclasses stored in bundle JSON."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}")
        return cls(**values)


# ViTConfig fields that are compute settings, not architecture: free to differ between a bundle and the model run.
COMPUTE_FIELDS = ("drop_path_rate", "drop_path_mode", "scan_layers", "remat_policy", "dtype", "param_dtype",
                  "attention_impl")


@dataclasses.dataclass(frozen=True)
class ViTConfig(JsonConfig):
    """Architecture + compute settings. JSON-serialisable (dtypes are strings) so it can live in an encoder bundle."""

    img_size: int = 224  # the grid the learned pos_embed is stored for: img_size // patch_size per side
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (fc1 -> GELU -> fc2) or "swiglu" (DINOv2 ViT-g: packed fc1 -> SiLU gate -> fc2)
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layerscale_init: float | None = 1e-5  # None: no LayerScale (timm default ViT, HF ViT)
    num_register_tokens: int = 0
    ln_eps: float = 1e-6
    gelu_approximate: bool = False  # False: exact erf GELU (DINOv2, timm, HF)
    use_mask_token: bool = True
    pos_embed_rule: str = "dinov2"  # see models/pos_embed.py
    pos_embed_offset: float = 0.1
    drop_path_rate: float = 0.0  # uniform over blocks, as GPFM/DINOv2 (drop_path_uniform)
    drop_path_mode: str = "auto"  # "auto": batch-subset above 0.1 (DINOv2's rule), per-sample otherwise
    scan_layers: bool = False
    remat_policy: str = "none"  # "none", "full", "dots_and_attention_saveable" or one of remat.JAX_POLICIES
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # "auto": "loop" on CPU, cuDNN flash attention on GPU in bf16/fp16, "xla" otherwise; "loop", "xla", "cudnn"
    # force one. All compute the same function (gpfm_jax/models/attention.py).
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"ffn must be one of {FFN_TYPES}, got {self.ffn!r}")
        if self.drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"drop_path_mode must be one of {DROP_PATH_MODES}, got {self.drop_path_mode!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.remat_policy != "none":
            try:
                remat.policy(self.remat_policy)
            except ValueError as err:
                raise ValueError(f"remat_policy: {err}") from None
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden_dim(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":  # DINOv2 SwiGLUFFNFused sizing
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden



def _partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


TRUNC_NORMAL = nn.initializers.truncated_normal(stddev=0.02)
TORCH_CONV_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))


def _dense(features: int, names: tuple[str | None, str | None], use_bias: bool, cfg: ViTConfig, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_partitioned(TRUNC_NORMAL, names),
        bias_init=_partitioned(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def _layer_norm(cfg: ViTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.ln_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=_partitioned(nn.initializers.ones_init(), ("embed",)),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class PatchProj(nn.Module):
    """Conv p x p stride p as one matmul over non-overlapping patches; kernel (p, p, C, D) as a flax Conv's."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg, p = self.cfg, self.cfg.patch_size
        kernel = self.param(
            "kernel",
            _partitioned(TORCH_CONV_DEFAULT, (None, None, None, "embed")),
            (p, p, cfg.in_chans, cfg.embed_dim),
            cfg.param_dtype,
        )
        fan_in = p * p * cfg.in_chans
        bias_init = nn.initializers.uniform(scale=2.0 / fan_in**0.5)
        bias = self.param(
            "bias",
            _partitioned(lambda k, s, d: bias_init(k, s, d) - 1.0 / fan_in**0.5, ("embed",)),
            (cfg.embed_dim,),
            cfg.param_dtype,
        )
        b, h, w, c = images.shape
        gh, gw = h // p, w // p
        patches = images[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, gh * gw, p * p * c).astype(cfg.dtype)
        out = patches @ kernel.reshape(p * p * c, cfg.embed_dim).astype(cfg.dtype)
        return out + bias.astype(cfg.dtype)


class Attention(nn.Module):
    """Multi-head self-attention. With `sets` ((b_i, n_i) per crop set) x holds several crop sets' tokens as one
    matrix (gpfm_jax/models/crops.py): QKV and the output projection run on all of it, attention per set."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array, sets: tuple[tuple[int, int], ...] | None = None) -> jax.Array:
        cfg = self.cfg
        d = x.shape[-1]
        head_dim = d // cfg.num_heads
        qkv = _dense(3 * d, ("embed", "qkv"), cfg.qkv_bias, cfg, "qkv")(x)
        qkv = nn.with_logical_constraint(qkv, ("batch", "tokens", "qkv"))
        impl = attention.resolve_impl(cfg.attention_impl, dtype=cfg.dtype)
        shards = batch_shards() if impl == "loop" else 1
        n_shards = 1 if sets is None else crops.shards(sets)
        outs = []
        for part in [qkv] if sets is None else crops.split(qkv, sets, n_shards):
            b, n = part.shape[:2]
            part = part.reshape(b, n, 3, cfg.num_heads, head_dim)
            out = attention.dot_product_attention(part[:, :, 0], part[:, :, 1], part[:, :, 2], impl, shards)
            outs.append(nn.with_logical_constraint(out.reshape(b, n, d), ("batch", "tokens", "heads")))
        out = outs[0] if sets is None else crops.concat(outs, n_shards)
        return _dense(d, ("heads", "embed"), cfg.proj_bias, cfg, "proj")(out)


class FeedForward(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, hidden = self.cfg, self.cfg.mlp_hidden_dim
        if cfg.ffn == "swiglu":
            gate_up = _dense(2 * hidden, ("embed", "mlp"), cfg.ffn_bias, cfg, "fc1")(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
            h = nn.silu(gate) * up
        else:
            h = nn.gelu(_dense(hidden, ("embed", "mlp"), cfg.ffn_bias, cfg, "fc1")(x), approximate=cfg.gelu_approximate)
        h = nn.with_logical_constraint(h, ("batch", "tokens", "mlp"))
        return _dense(cfg.embed_dim, ("mlp", "embed"), cfg.ffn_bias, cfg, "fc2")(h)


class LayerScale(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init_value = self.cfg.layerscale_init
        gamma = self.param(
            "gamma",
            _partitioned(lambda k, s, d: jnp.full(s, init_value, d), ("embed",)),
            (self.cfg.embed_dim,),
            self.cfg.param_dtype,
        )
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), each with stochastic depth."""

    cfg: ViTConfig
    train: bool = False
    drop_path_groups: int = 1
    drop_path_total_groups: int = 0  # with group ids: the groups of the whole batch this microbatch belongs to

    @nn.compact
    def __call__(self, x: jax.Array | tuple[jax.Array, ...], group_ids: jax.Array | None = None):
        """x: [b, n, d], or a tuple of crop sets [b_i, n_i, d] whose tokens go through the LayerNorms and linear
        layers as one matrix (set i's drop path draws from rng stream crops.STREAMS[i]). Returns (x, None)."""
        cfg = self.cfg
        norm1, attn = _layer_norm(cfg, "norm1"), Attention(cfg, name="attn")
        norm2, mlp = _layer_norm(cfg, "norm2"), FeedForward(cfg, name="mlp")
        if cfg.layerscale_init is not None:
            ls1, ls2 = LayerScale(cfg, name="ls1"), LayerScale(cfg, name="ls2")
        else:
            ls1 = ls2 = lambda y: y
        xs = list(x) if isinstance(x, tuple) else [x]
        rate = cfg.drop_path_rate if self.train else 0.0
        streams = crops.STREAMS[: len(xs)]
        rngs = [[self.make_rng(s), self.make_rng(s)] for s in streams] if rate > 0.0 else None
        groups = (self.drop_path_groups, group_ids, self.drop_path_total_groups)

        def branch(norm, layer, scale):
            def run(ys):
                if len(ys) == 1:
                    return [scale(layer(norm(ys[0]), None))]
                sets = tuple(y.shape[:2] for y in ys)
                n_shards = crops.shards(sets)
                z = nn.with_logical_constraint(crops.concat(ys, n_shards), ("batch", "tokens", "embed"))
                return crops.split(scale(layer(norm(z), sets)), sets, n_shards)
            return run

        attn_rngs = None if rngs is None else [r[0] for r in rngs]
        mlp_rngs = None if rngs is None else [r[1] for r in rngs]
        xs = add_residuals(xs, branch(norm1, attn, ls1), rate, cfg.drop_path_mode, attn_rngs, *groups)
        xs = add_residuals(xs, branch(norm2, lambda h, _: mlp(h), ls2), rate, cfg.drop_path_mode, mlp_rngs,
                           *groups)
        xs = [nn.with_logical_constraint(y, ("batch", "tokens", "embed")) for y in xs]
        return (tuple(xs) if isinstance(x, tuple) else xs[0]), None


def _block_class(cfg: ViTConfig) -> type[nn.Module]:
    block = remat.wrap(Block, cfg.remat_policy, cfg.scan_layers)
    if cfg.scan_layers:
        block = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True} | {stream: True for stream in crops.STREAMS},
            in_axes=nn.broadcast,
            length=cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
    return block


class VisionTransformer(nn.Module):
    """images f32[B, H, W, C] (normalised, NHWC) [+ masks bool[B, gh*gw]] -> {"cls", "patch", "registers", "tokens"}.

    All outputs are after the final LayerNorm: "cls" [B, D] (the GPFM feature, also what KoLeo uses), "patch"
    [B, gh*gw, D], "registers" [B, R, D] and "tokens" [B, 1 + R + gh*gw, D] (everything, for attentional pooling).
    `masks` (True = masked) replace patch embeddings by the mask token BEFORE the position embedding is added.
    Stochastic depth needs `train=True` and a "drop_path" rng; batch-subset drop path draws its subsets within
    `drop_path_groups` contiguous groups of the batch (the training step: one per device). A microbatch of a larger
    batch passes `drop_path_group_ids` (int [drop_path_groups], traced) and `drop_path_total_groups`: its groups then
    draw exactly what they draw in the whole batch.
    """

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array | tuple[jax.Array, ...], masks: Any = None, train: bool = False,
                 drop_path_groups: int = 1, drop_path_group_ids: jax.Array | None = None,
                 drop_path_total_groups: int = 0) -> dict[str, jax.Array] | list[dict[str, jax.Array]]:
        """`images` may be a tuple of crop sets (each [B_i, H_i, W_i, C]; `masks` then a tuple of masks or None):
        one output dict per set, their tokens through each block's linear layers as one matrix (crops.py), set i's
        stochastic depth drawn from rng stream crops.STREAMS[i] as a forward of that set alone draws from
        "drop_path"."""
        cfg = self.cfg
        multi = isinstance(images, tuple)
        image_sets = images if multi else (images,)
        mask_sets = (masks if masks is not None else (None,) * len(images)) if multi else (masks,)
        patch_embed = _PatchEmbed(cfg, name="patch_embed")
        embedded = [patch_embed(i) for i in image_sets]
        d = cfg.embed_dim
        if cfg.use_mask_token:
            mask_token = self.param(
                "mask_token", _partitioned(nn.initializers.zeros_init(), (None, "embed")), (1, d), cfg.param_dtype
            )
        cls_token = self.param(
            "cls_token", _partitioned(nn.initializers.normal(1e-6), (None, None, "embed")), (1, 1, d), cfg.param_dtype
        )
        pos_embed = self.param(
            "pos_embed",
            _partitioned(TRUNC_NORMAL, (None, "tokens", "embed")),
            (1, 1 + cfg.num_patches, d),
            cfg.param_dtype,
        )
        if cfg.num_register_tokens:
            registers = self.param(
                "register_tokens",
                _partitioned(nn.initializers.normal(1e-6), (None, None, "embed")),
                (1, cfg.num_register_tokens, d),
                cfg.param_dtype,
            )
        xs = []
        for x, imgs, m in zip(embedded, image_sets, mask_sets):
            b, n, _ = x.shape
            gh, gw = imgs.shape[1] // cfg.patch_size, imgs.shape[2] // cfg.patch_size
            if m is not None:
                if not cfg.use_mask_token:
                    raise ValueError("this encoder has no mask_token (use_mask_token=False) but masks were given")
                if m.shape != (b, n):
                    raise ValueError(f"masks must have shape {(b, n)} for this input, got {m.shape}")
                x = jnp.where(m[..., None], mask_token.astype(x.dtype), x)
            patch_pos = pos_embed[:, 1:]
            if needs_resampling(cfg.num_patches, (gh, gw), cfg.pos_embed_rule):
                patch_pos = resample_patch_pos_embed(patch_pos, (gh, gw), cfg.pos_embed_rule, cfg.pos_embed_offset)
            x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (b, 1, d)), x], axis=1)
            x = x + jnp.concatenate([pos_embed[:, :1], patch_pos], axis=1).astype(x.dtype)
            if cfg.num_register_tokens:
                regs = jnp.broadcast_to(registers.astype(x.dtype), (b, cfg.num_register_tokens, d))
                x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
            xs.append(nn.with_logical_constraint(x, ("batch", "tokens", "embed")))

        x = tuple(xs) if multi else xs[0]
        block_cls = _block_class(cfg)
        groups = (drop_path_groups, drop_path_total_groups)
        if cfg.scan_layers:
            x, _ = block_cls(cfg, train, *groups, name="blocks")(x, drop_path_group_ids)
        else:
            for i in range(cfg.depth):
                x, _ = block_cls(cfg, train, *groups, name=f"blocks_{i}")(x, drop_path_group_ids)

        norm, r = _layer_norm(cfg, "norm"), cfg.num_register_tokens
        outs = []
        for y in x if multi else (x,):
            y = norm(y)
            outs.append({"cls": y[:, 0], "registers": y[:, 1 : 1 + r], "patch": y[:, 1 + r :], "tokens": y})
        return outs if multi else outs[0]


class _PatchEmbed(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != self.cfg.in_chans:
            raise ValueError(f"images must be NHWC with {self.cfg.in_chans} channels, got shape {images.shape}")
        x = PatchProj(self.cfg, name="proj")(images)
        return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))
