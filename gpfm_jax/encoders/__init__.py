"""Builds a runnable encoder (Flax module + params) from an encoder bundle's JSON.

Each encoder kind registers a builder under the name stored in `encoder.json` ("encoder": "vit", ...), so tools that
only get a bundle folder (training init, teachers, feature extraction) can run it without extra flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import flax.linen as nn

from gpfm_jax.convert.bundle import load_bundle
from gpfm_jax.convert.layout import to_layout
from gpfm_jax.models.vit import ViTConfig, VisionTransformer

# name -> builder(meta, overrides) -> module
ENCODER_BUILDERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], nn.Module]] = {}


def register_encoder(name: str):
    def decorate(builder):
        ENCODER_BUILDERS[name] = builder
        return builder

    return decorate


@register_encoder("vit")
def _build_vit(meta: dict[str, Any], overrides: dict[str, Any]) -> nn.Module:
    return VisionTransformer(vit_config(meta, **overrides))


def vit_config(meta: dict[str, Any], **overrides: Any) -> ViTConfig:
    """The bundle's ViT config with compute settings (dtype, scan_layers, remat_policy, ...) overridden."""
    return ViTConfig.from_dict(meta["vit"]).replace(**overrides)


def build_encoder(meta: dict[str, Any], **overrides: Any) -> nn.Module:
    kind = meta.get("encoder")
    if kind not in ENCODER_BUILDERS:
        raise ValueError(f"unknown encoder kind {kind!r} in bundle; known: {sorted(ENCODER_BUILDERS)}")
    return ENCODER_BUILDERS[kind](meta, overrides)


def load_encoder(directory: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(module, params in the module's layout, meta) for a bundle folder."""
    params, meta = load_bundle(directory)
    module = build_encoder(meta, **overrides)
    return module, to_module_layout(module, params), meta


def to_module_layout(module: nn.Module, params: dict[str, Any]) -> dict[str, Any]:
    """Bundles store unscanned blocks; a module built with scan_layers wants them stacked (trunk of a pooled ViT)."""
    from gpfm_jax.models.pooling import PooledViT

    if isinstance(module, VisionTransformer):
        return to_layout(params, module.cfg.scan_layers)
    if isinstance(module, PooledViT):
        return {**params, "trunk": to_layout(dict(params["trunk"]), module.vit.scan_layers)}
    return params


@register_encoder("vit_attnpool")
def _build_vit_attnpool(meta: dict[str, Any], overrides: dict[str, Any]) -> nn.Module:
    """ViT trunk + attentional pool head (CONCH teacher bundles); params {"trunk": ..., "pooler": ...}."""
    from gpfm_jax.models.pooling import PooledViT, PoolerConfig

    return PooledViT(vit_config(meta, **overrides), PoolerConfig.from_dict(meta["pooler"]))
