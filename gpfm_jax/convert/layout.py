"""Scanned <-> unscanned block layouts of a ViT param tree.

Unscanned: {"blocks_0": {...}, "blocks_1": {...}, ...}. Scanned (nn.scan): {"blocks": {...}} with every leaf carrying
a leading layer axis. Both hold the same numbers; these functions move between them exactly (stack / index).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

_BLOCK_KEY = re.compile(r"^blocks_(\d+)$")


def is_scanned(params: dict[str, Any]) -> bool:
    return "blocks" in params


def num_blocks(params: dict[str, Any]) -> int:
    if is_scanned(params):
        return int(jax.tree_util.tree_leaves(params["blocks"])[0].shape[0])
    return sum(1 for k in params if _BLOCK_KEY.match(k))


def stack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """Unscanned -> scanned. Other entries are passed through untouched."""
    if is_scanned(params):
        return dict(params)
    depth = num_blocks(params)
    missing = [i for i in range(depth) if f"blocks_{i}" not in params]
    if missing:
        raise ValueError(f"block params are not contiguous: blocks_{missing[0]} is missing")
    blocks = [params[f"blocks_{i}"] for i in range(depth)]
    out = {k: v for k, v in params.items() if not _BLOCK_KEY.match(k)}
    out["blocks"] = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
    return out


def unstack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """Scanned -> unscanned. Other entries are passed through untouched."""
    if not is_scanned(params):
        return dict(params)
    depth = num_blocks(params)
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x: np.asarray(x)[i], params["blocks"])
    return out


def to_layout(params: dict[str, Any], scanned: bool) -> dict[str, Any]:
    return stack_blocks(params) if scanned else unstack_blocks(params)
