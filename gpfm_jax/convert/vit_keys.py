"""Key and layout mapping between PyTorch ViT state dicts (timm / DINOv2 / GPFM release) and our Flax params.

Canonical PyTorch names are timm's (`blocks.{i}.attn.qkv.weight`, ...). The GPFM GitHub release stores the EMA teacher
as `{'teacher': {'backbone.blocks.{c}.{i}.*', 'dino_head.*'}}` (DINOv2 block chunks); it is normalised to the canonical
names first. Conversion is strict: every source key is used or explicitly documented as unused, every shape checked.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from gpfm_jax.convert.torch_io import CheckpointError
from gpfm_jax.models.vit import ViTConfig

# Keys present in the official release that the encoder does not use (the DINO/iBOT projection head).
UNUSED_PREFIXES = ("dino_head.", "ibot_head.")
WRAPPER_KEYS = ("teacher", "model", "state_dict")
# Heads per width for the standard ViT sizes (shapes cannot tell the head count).
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}

# (torch suffix inside a block, flax path inside the block, transform)
_BLOCK_TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("norm1.weight", ("norm1", "scale"), "copy"),
    ("norm1.bias", ("norm1", "bias"), "copy"),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), "copy"),
    ("attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
    ("attn.proj.bias", ("attn", "proj", "bias"), "copy"),
    ("ls1.gamma", ("ls1", "gamma"), "copy"),
    ("norm2.weight", ("norm2", "scale"), "copy"),
    ("norm2.bias", ("norm2", "bias"), "copy"),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "linear"),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "copy"),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "linear"),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "copy"),
    ("ls2.gamma", ("ls2", "gamma"), "copy"),
)
_TOP_TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("cls_token", ("cls_token",), "copy"),
    ("pos_embed", ("pos_embed",), "copy"),
    ("mask_token", ("mask_token",), "copy"),
    ("register_tokens", ("register_tokens",), "copy"),
    ("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), "conv"),
    ("patch_embed.proj.bias", ("patch_embed", "proj", "bias"), "copy"),
    ("norm.weight", ("norm", "scale"), "copy"),
    ("norm.bias", ("norm", "bias"), "copy"),
)
# DINOv2 spellings -> timm spellings.
_RENAMES = ((".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2."))
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def unwrap_state(obj: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Finds the flat state dict inside a checkpoint: the GPFM release keeps it under 'teacher'."""
    state: Any = obj
    while isinstance(state, Mapping) and not any(isinstance(v, np.ndarray) for v in state.values()):
        wrapper = next((k for k in WRAPPER_KEYS if k in state), None)
        if wrapper is None:
            raise CheckpointError(f"{source}: no tensors at the top level and none of the keys {WRAPPER_KEYS}")
        state = state[wrapper]
    return dict(state)


def canonical_keys(state: Mapping[str, Any], source: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Strips 'backbone.', un-chunks 'blocks.{c}.{i}.', renames DINOv2 SwiGLU keys; returns (canonical, ignored)."""
    canonical: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            ignored.append(key)
            continue
        name = key[len("backbone.") :] if key.startswith("backbone.") else key
        name = _CHUNKED.sub(r"blocks.\2.", name)
        for old, new in _RENAMES:
            name = name.replace(old, new)
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{source}: key {key!r} is not a tensor ({type(value).__name__})")
        if name in canonical:
            raise CheckpointError(f"{source}: key {key!r} maps to {name!r}, which is already present")
        canonical[name] = value
    return canonical, ignored


def _require(state: Mapping[str, np.ndarray], key: str, source: str) -> np.ndarray:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return state[key]


def infer_vit_config(state: Mapping[str, np.ndarray], source: str, **overrides: Any) -> ViTConfig:
    """Reads the architecture off the tensor shapes (head count from the width unless given)."""
    cls_token = _require(state, "cls_token", source)
    patch_w = _require(state, "patch_embed.proj.weight", source)
    pos_embed = _require(state, "pos_embed", source)
    embed_dim, in_chans, patch = int(patch_w.shape[0]), int(patch_w.shape[1]), int(patch_w.shape[2])
    if cls_token.shape[-1] != embed_dim:
        raise CheckpointError(f"{source}: cls_token width {cls_token.shape[-1]} != patch_embed width {embed_dim}")
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{source}: block indices are not 0..depth-1: {blocks[:5]}...")
    grid = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if grid * grid != pos_embed.shape[1] - 1:
        raise CheckpointError(f"{source}: pos_embed has {pos_embed.shape[1]} positions; expected 1 + a square grid")
    fc1 = _require(state, "blocks.0.mlp.fc1.weight", source)
    fc2 = _require(state, "blocks.0.mlp.fc2.weight", source)
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    inferred: dict[str, Any] = dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=len(blocks),
        ffn="swiglu" if swiglu else "mlp",
        mlp_ratio=fc1.shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias="blocks.0.mlp.fc1.bias" in state,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state else None,
        num_register_tokens=int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0,
    )
    if swiglu:  # ViTConfig.mlp_hidden_dim re-derives the packed size from the ratio (DINOv2 sizing)
        inferred["mlp_ratio"] = _swiglu_ratio(embed_dim, fc2.shape[1])
    if "num_heads" not in overrides:
        if embed_dim not in HEADS_BY_WIDTH:
            raise CheckpointError(f"{source}: width {embed_dim} is not a standard ViT size; give num_heads explicitly")
        inferred["num_heads"] = HEADS_BY_WIDTH[embed_dim]
    inferred.update(overrides)
    return ViTConfig(**inferred)


def _swiglu_ratio(embed_dim: int, hidden: int) -> float:
    for ratio in (4.0, 8 / 3, 5.33334, 2.66667):
        if ViTConfig(embed_dim=embed_dim, num_heads=1, ffn="swiglu", mlp_ratio=ratio).mlp_hidden_dim == hidden:
            return ratio
    raise CheckpointError(f"SwiGLU hidden size {hidden} does not follow the DINOv2 sizing rule")


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(value.T)
    if kind == "conv":  # (D, C, p, p) -> (p, p, C, D)
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    return value


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(np.asarray(value).T)
    if kind == "conv":
        return np.ascontiguousarray(np.asarray(value).transpose(3, 2, 0, 1))
    return np.asarray(value)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _entries(cfg: ViTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Every (torch key, flax path, transform) that a model with this config has."""
    entries = [e for e in _TOP_TABLE if _has_top(e[0], cfg)]
    for i in range(cfg.depth):
        for suffix, path, kind in _BLOCK_TABLE:
            if _has_block_param(suffix, cfg):
                entries.append((f"blocks.{i}.{suffix}", (f"blocks_{i}",) + path, kind))
    return entries


def _has_top(key: str, cfg: ViTConfig) -> bool:
    if key == "mask_token":
        return cfg.use_mask_token
    if key == "register_tokens":
        return cfg.num_register_tokens > 0
    return True


def _has_block_param(suffix: str, cfg: ViTConfig) -> bool:
    if suffix.startswith(("ls1.", "ls2.")):
        return cfg.layerscale_init is not None
    if suffix == "attn.qkv.bias":
        return cfg.qkv_bias
    if suffix == "attn.proj.bias":
        return cfg.proj_bias
    if suffix in ("mlp.fc1.bias", "mlp.fc2.bias"):
        return cfg.ffn_bias
    return True


def expected_torch_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Canonical PyTorch shapes for a config, to check a file against before any conversion."""
    import jax

    from gpfm_jax.models.vit import VisionTransformer

    model = VisionTransformer(cfg.replace(scan_layers=False, remat_policy="none"))
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans)))
    )
    import flax.linen as nn

    params = nn.meta.unbox(shapes)["params"]
    out = {}
    for key, path, kind in _entries(cfg):
        shape = tuple(_get(params, path).shape)
        if kind == "linear":
            shape = shape[::-1]
        elif kind == "conv":
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[key] = shape
    return out


def vit_params_from_torch(
    state: Mapping[str, np.ndarray], cfg: ViTConfig, source: str, optional: tuple[str, ...] = ("mask_token",)
) -> dict[str, Any]:
    """Canonical PyTorch state -> unscanned Flax params. Strict: unknown, missing or mis-shaped keys raise.

    Keys in `optional` may be absent (timm files have no mask_token); they are created as at init (zeros).
    """
    expected = expected_torch_shapes(cfg)
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise CheckpointError(f"{source}: unexpected key {unknown[0]!r} for this architecture ({len(unknown)} unknown)")
    params: dict[str, Any] = {}
    for key, path, kind in _entries(cfg):
        if key not in state:
            if key in optional:
                _set(params, path, np.zeros(expected[key], np.float32))
                continue
            raise CheckpointError(f"{source}: missing key {key!r}")
        value = state[key]
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {expected[key]} for this architecture"
            )
        _set(params, path, _to_flax(value, kind))
    return params


def vit_params_to_torch(params: Mapping[str, Any], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Unscanned Flax params -> canonical PyTorch state (timm names, plus mask_token / register_tokens)."""
    state = {}
    for key, path, kind in _entries(cfg):
        value = _get(params, path)
        if value is None:
            raise CheckpointError(f"params have no entry {'/'.join(path)} (torch key {key!r})")
        state[key] = _to_torch(np.asarray(value), kind)
    return state


def to_timm_state(canonical: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's ViT has no mask_token (dropped). Register models are refused: timm's register ViTs keep no position
    for the class token (no_embed_class), so DINOv2-layout registers have no exact timm equivalent."""
    if "register_tokens" in canonical:
        raise CheckpointError("timm format: models with register tokens are not exported exactly; use --format gpfm")
    return {k: v for k, v in canonical.items() if k != "mask_token"}


def to_gpfm_state(canonical: Mapping[str, np.ndarray], depth: int, block_chunks: int = 4) -> dict[str, Any]:
    """The official release layout: {'teacher': {'backbone.blocks.{c}.{i}.*', ...}} with c = i // (depth/chunks).

    GPFM's ViT-L (depth 24) ships 4 chunks. A depth that 4 does not divide (small models) gets the largest chunk
    count below it that does, which DINOv2 loads with `block_chunks` set to it."""
    block_chunks = max(c for c in range(1, block_chunks + 1) if depth % c == 0)
    chunk = depth // block_chunks
    teacher = {}
    for key, value in canonical.items():
        match = _BLOCK.match(key)
        if match:
            i = int(match.group(1))
            key = f"blocks.{i // chunk}.{i}.{match.group(2)}"
        teacher[f"backbone.{key}"] = value
    return {"teacher": teacher}
