"""DINOv2 `DINOHead` state dicts <-> Flax `models.heads.DINOHead` params (the DINO/iBOT head, distillation heads).

PyTorch keys (under a prefix such as 'dino_head.'):
  mlp.{0,2,4}.weight (out, in) / .bias     <->  mlp_{0,2,4}/kernel (in, out) / bias    (nlayers = 3)
  mlp.weight / mlp.bias                     <->  mlp/kernel / bias                      (nlayers = 1)
  last_layer.weight_g (K, 1)                <->  last_layer/weight_g (K,)
  last_layer.weight_v (K, d)                <->  last_layer/weight_v (d, K)
torch's newer parametrised weight norm names the last two `last_layer.parametrizations.weight.original0/1`; both
spellings are read. The GPFM release ships the EMA teacher's `dino_head.*` next to its backbone, and the official
DINOv2 training state has `student.dino_head.*`; with these maps a run can continue from either.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from gpfm_jax.convert.torch_io import CheckpointError

_MLP = re.compile(r"^mlp(?:\.(\d+))?\.(weight|bias)$")
_ALIASES = {
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}


def head_state(state: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """The entries of `state` under `prefix`, prefix stripped, weight-norm aliases unified."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            out[_ALIASES.get(name, name)] = np.asarray(value)
    return out


def dino_head_from_torch(state: Mapping[str, Any], source: str, prefix: str = "dino_head.") -> dict[str, Any]:
    """Torch head state (keys under `prefix`) -> Flax params. Strict: unknown or missing keys raise, naming them."""
    head = head_state(state, prefix)
    if not head:
        raise CheckpointError(f"{source}: no keys under {prefix!r}")
    params: dict[str, Any] = {}
    for name, value in head.items():
        match = _MLP.match(name)
        if match:
            scope = f"mlp_{match.group(1)}" if match.group(1) is not None else "mlp"
            leaf = "kernel" if match.group(2) == "weight" else "bias"
            if leaf == "kernel" and value.ndim != 2:
                raise CheckpointError(f"{source}: key {prefix + name!r} has shape {value.shape}, expected 2-D")
            params.setdefault(scope, {})[leaf] = value.T if leaf == "kernel" else value
        elif name == "last_layer.weight_g":
            params.setdefault("last_layer", {})["weight_g"] = value.reshape(-1)
        elif name == "last_layer.weight_v":
            params.setdefault("last_layer", {})["weight_v"] = value.T
        else:
            raise CheckpointError(f"{source}: unexpected key {prefix + name!r} in a DINO head")
    last = params.get("last_layer", {})
    for leaf in ("weight_g", "weight_v"):
        if leaf not in last:
            raise CheckpointError(f"{source}: missing key {prefix + 'last_layer.' + leaf!r}")
    for scope, leaves in params.items():
        if scope != "last_layer" and set(leaves) != {"kernel", "bias"}:
            missing = "bias" if "kernel" in leaves else "weight"
            number = scope.split("_")[1] + "." if "_" in scope else ""
            raise CheckpointError(f"{source}: missing key {prefix + 'mlp.' + number + missing!r}")
    if last["weight_g"].shape[0] != last["weight_v"].shape[1]:
        raise CheckpointError(f"{source}: {prefix}last_layer weight_g {last['weight_g'].shape} does not match "
                              f"weight_v {last['weight_v'].shape[::-1]}")
    return params


def dino_head_to_torch(params: Mapping[str, Any], prefix: str = "dino_head.") -> dict[str, np.ndarray]:
    """Flax head params -> torch state dict entries under `prefix` (the old weight_norm names)."""
    out = {}
    for scope, leaves in params.items():
        if scope == "last_layer":
            g = np.asarray(leaves["weight_g"])
            out[f"{prefix}last_layer.weight_g"] = g.reshape(-1, 1)
            out[f"{prefix}last_layer.weight_v"] = np.asarray(leaves["weight_v"]).T
            continue
        number = scope.split("_")[1] + "." if "_" in scope else ""
        out[f"{prefix}mlp.{number}weight"] = np.asarray(leaves["kernel"]).T
        out[f"{prefix}mlp.{number}bias"] = np.asarray(leaves["bias"])
    return out
