"""GPFM optimiser: per-module grad clipping -> Adam moments -> scheduled, layer-decayed, decoupled-WD step.

The student parameter tree is {"backbone": ViT params, "dino_head": DINOHead params, "distill_heads": {teacher:
head params}} (unboxed, see flax.linen.meta.unbox). What DINOv2/GPFM do, and this reproduces:
  * clipping: `for v in student.values(): v.clip_grad_norm_(3.0)`, i.e. the backbone and the DINO head are each
    clipped to norm 3 on their own (torch rule: scale by max_norm / (norm + 1e-6) when that is < 1); the
    distillation heads are not in `student` and are not clipped;
  * torch AdamW(0.9, 0.999, eps 1e-8) with per-parameter lr = schedule * multiplier, weight_decay = wd * wd_mult:
    p <- p - lr * mult * (adam(g) + wd * mask * p);
  * multiplier = layer-wise decay (`lr_multipliers`); wd mask False on biases, norms and LayerScale gammas (names
    ending in bias, containing "norm" or "gamma"), True on everything else, pos/cls/mask tokens and the
    weight-normalised layers' weight_g included (DINOv2's `get_params_groups_with_decay`);
  * params under a "last_layer" scope use the last-layer LR, 0 for the first 1,250 steps (moments still update).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpfm_jax.step.schedules import Schedules

PyTree = Any
EMBEDDING_KEYS = ("pos_embed", "cls_token", "mask_token", "register_tokens")
_BLOCK = re.compile(r"^blocks_(\d+)$")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Every number of SPEC's Optimisation section outside the schedules; defaults = GPFM ViT-L."""

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad_norm: float = 3.0  # <= 0: no clipping
    clip_keys: tuple[str, ...] = ("backbone", "dino_head")
    clip_per_module: bool = True  # DINOv2: each student module on its own; False: one joint norm over clip_keys
    backbone_key: str = "backbone"


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def backbone_depth(backbone: PyTree) -> int:
    """Number of blocks, from `blocks_{i}` scopes or the leading axis of a scanned `blocks` scope."""
    if "blocks" in backbone:
        return int(jax.tree_util.tree_leaves(backbone["blocks"])[0].shape[0])
    return sum(1 for k in backbone if _BLOCK.match(k))


def lr_multipliers(
    params: PyTree,
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    backbone_key: str | None = "backbone",
    depth: int | None = None,
) -> PyTree:
    """Per-leaf LR multiplier (DINOv2 `get_vit_lr_decay_rate`), same structure as `params`.

    In the backbone: block i -> d^(depth - i); pos_embed, cls_token, mask_token, register_tokens, patch_embed ->
    d^(depth + 1), patch_embed times `patch_embed_lr_mult`; anything else (final norm) -> 1. Outside the backbone
    (heads) -> 1. A scanned `blocks` leaf gets a float32 vector over its leading layer axis, shaped to broadcast.
    `backbone_key=None` means `params` is the backbone itself.
    """
    params = nn.meta.unbox(params)
    backbone = params if backbone_key is None else params[backbone_key]
    depth = backbone_depth(backbone) if depth is None else depth
    per_layer = np.asarray([layer_decay ** (depth - i) for i in range(depth)], np.float32)

    def leaf(path, x):
        keys = _keys(path)
        if backbone_key is not None:
            if keys[0] != backbone_key:
                return 1.0
            keys = keys[1:]
        top = keys[0]
        if top in EMBEDDING_KEYS:
            return layer_decay ** (depth + 1)
        if top == "patch_embed":
            return layer_decay ** (depth + 1) * patch_embed_lr_mult
        if top == "blocks":
            return per_layer.reshape((depth,) + (1,) * (len(x.shape) - 1))
        match = _BLOCK.match(top)
        if match:
            return layer_decay ** (depth - int(match.group(1)))
        return 1.0

    return jax.tree_util.tree_map_with_path(leaf, params)


def weight_decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies: not on biases, norms (any scope with "norm") or LayerScale gammas."""

    def leaf(path, _):
        keys = _keys(path)
        return not (keys[-1].endswith("bias") or any("norm" in k or "gamma" in k for k in keys))

    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(params))


def last_layer_mask(params: PyTree) -> PyTree:
    """True on the weight-normalised last layers (DINO head and distillation heads)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "last_layer" in _keys(path), nn.meta.unbox(params))


class ModuleClipState(NamedTuple):
    grad_norms: dict[str, jax.Array]  # pre-clip global norm of each clipped group, for metrics


def clip_modules_by_norm(
    max_norm: float, keys: Sequence[str] = ("backbone", "dino_head"), per_module: bool = True
) -> optax.GradientTransformation:
    """Clip the top-level subtrees in `keys` (each alone, or jointly) to `max_norm`; leave the others untouched.

    torch `clip_grad_norm_`: g *= max_norm / (norm + 1e-6) when that factor is below 1.
    """
    groups = [(k,) for k in keys] if per_module else [tuple(keys)]
    names = ["+".join(g) for g in groups]

    def init_fn(params):
        del params
        return ModuleClipState({n: jnp.zeros((), jnp.float32) for n in names})

    def update_fn(updates, state, params=None):
        del params, state
        updates = dict(updates)
        norms = {}
        for name, group in zip(names, groups):
            norm = optax.tree.norm({k: updates[k] for k in group})
            norms[name] = norm
            if max_norm > 0:
                scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
                for k in group:
                    updates[k] = jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), updates[k])
        return updates, ModuleClipState(norms)

    return optax.GradientTransformation(init_fn, update_fn)


class ScheduleState(NamedTuple):
    count: jax.Array  # the 0-based iteration the next update uses


def scale_by_schedules(
    schedules: Schedules, lr_mult: PyTree, wd_mask: PyTree, is_last_layer: PyTree
) -> optax.GradientTransformation:
    """u -> -lr(t) * mult * (u + wd(t) * mask * p), lr = last_layer_lr on last layers (decoupled WD, torch AdamW)."""

    def init_fn(params):
        del params
        return ScheduleState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_schedules needs params (decoupled weight decay)")
        lr = schedules.lr(state.count)
        last_lr = schedules.last_layer_lr(state.count)
        wd = schedules.weight_decay(state.count)

        def leaf(u, p, mult, decay, last):
            step_lr = (last_lr if last else lr) * jnp.asarray(mult, jnp.float32)
            direction = u.astype(jnp.float32) + (wd * p.astype(jnp.float32) if decay else 0.0)
            return (-step_lr * direction).astype(u.dtype)

        new = jax.tree_util.tree_map(leaf, updates, params, lr_mult, wd_mask, is_last_layer)
        return new, ScheduleState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(params: PyTree, schedules: Schedules, cfg: OptimConfig = OptimConfig()) -> optax.GradientTransformation:
    """The full GPFM student optimiser. `params` (arrays or ShapeDtypeStructs) only fixes the structure."""
    params = nn.meta.unbox(params)
    return optax.chain(
        clip_modules_by_norm(cfg.clip_grad_norm, cfg.clip_keys, cfg.clip_per_module),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        scale_by_schedules(
            schedules,
            lr_multipliers(params, cfg.layer_decay, cfg.patch_embed_lr_mult, cfg.backbone_key),
            weight_decay_mask(params),
            last_layer_mask(params),
        ),
    )


def grad_norms(opt_state: PyTree) -> dict[str, jax.Array]:
    """Pre-clip gradient norms from a `make_optimizer` state ("grad_norm/backbone", ...)."""
    return {f"grad_norm/{k}": v for k, v in opt_state[0].grad_norms.items()}


def ema_update(teacher: PyTree, student: PyTree, momentum: float | jax.Array) -> PyTree:
    """teacher * m + student * (1 - m), leafwise; the trees must match (pass the student's backbone + DINO head)."""
    return jax.tree_util.tree_map(
        lambda t, s: (t * momentum + s.astype(t.dtype) * (1.0 - momentum)).astype(t.dtype), teacher, student)
