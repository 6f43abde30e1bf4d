"""Where every array lives: the (data, fsdp) mesh, logical-axis rules for activations, FSDP rules for state.

- Batch: split over both mesh axes (every device holds a slice of the global batch).
- State (params, EMA teacher, optimizer moments, expert teachers): FSDP / ZeRO-3 style — each array with at least
  `min_size` elements is split over the `fsdp` axis along its largest dimension divisible by the axis size; XLA
  all-gathers it where it is used. The leading layer axis of scanned blocks is never split (each scan iteration
  needs its own layer whole on every device). Small arrays (biases, norms) are replicated.
- Activations: model code names logical axes; only "batch" maps to mesh axes.
Mesh axes are `Auto`: shardings are given at the jit boundary and by constraints, and XLA propagates the rest.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
SCANNED_KEY = "blocks"  # nn.scan scope of the ViT: leading axis = layers
MIN_SHARD_SIZE = 2**12  # 4096 elements: kernels are split, biases and norm scales replicated


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all, across hosts); data=-1 takes what fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"{len(devices)} devices are not divisible by fsdp={fsdp}")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, have {len(devices)}")
    return jax.make_mesh((data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def logical_rules() -> tuple[tuple[str, Any], ...]:
    """Logical activation axes -> mesh axes (flax `nn.logical_axis_rules`). Everything but the batch is replicated."""
    return (
        ("batch", BATCH_AXES),
        ("tokens", None),
        ("embed", None),
        ("mlp", None),
        ("qkv", None),
        ("heads", None),
        ("layers", None),
    )


def _path_keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def fsdp_spec(path_keys: tuple[str, ...], shape: tuple[int, ...], fsdp_size: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """Split the largest dimension divisible by `fsdp_size` (never a scanned layer axis); replicate small arrays."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    first = 1 if SCANNED_KEY in path_keys and len(shape) > 1 else 0
    candidates = [d for d in range(first, len(shape)) if shape[d] % fsdp_size == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda d: (shape[d], -d))
    spec = [None] * len(shape)
    spec[dim] = FSDP
    return P(*spec)


def state_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params, optimizer state, ...)."""
    fsdp_size = mesh.shape[FSDP]

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, fsdp_spec(_path_keys(path), shape, fsdp_size, min_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def place(tree: Any, mesh: Mesh) -> Any:
    """device_put a state-like tree (train state, expert params) into its FSDP shardings."""
    return jax.device_put(tree, state_shardings(tree, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host arrays (this process's share, sample-major: leading axis = samples) -> global arrays whose leading
    axis is split over the batch axes. Sample-major keeps all views of a sample on one device, so the step's
    flattening to [B * V, ...] needs no communication."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
