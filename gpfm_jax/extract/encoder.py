"""An encoder bundle or a training checkpoint -> a jitted function from a uint8 tile batch to float32 features.

Normalisation (/255, mean/std from the bundle JSON) runs inside the jitted function, so the host only resizes and
the device receives uint8 (4x less to transfer than float32). Batches are padded to one fixed shape so XLA compiles
once per run; `dispatch` returns without waiting, so the caller can prepare the next batch while this one computes.

Every local device takes part: the forward is jitted over a one-axis data-parallel mesh of this process's devices
(all of them, or the first `devices`), the parameters replicated and the batch split along its first axis, so the
batch size is a multiple of the device count. Each device runs the same per-tile program as one device would, so
the features do not depend on the number of devices. Only local devices: under jax.distributed every process
extracts its own share of the input (runner.py), no collective crosses hosts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gpfm_jax import storage
from gpfm_jax.convert.bundle import load_meta, preprocessing
from gpfm_jax.convert.student import checkpoint_folder, is_training_checkpoint
from gpfm_jax.convert.torch_io import CheckpointError
from gpfm_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels

DTYPES = ("float32", "bfloat16")
DATA_AXIS = "data"


def local_mesh(devices: int | None = None) -> jax.sharding.Mesh:
    """A one-axis ('data') mesh over this process's first `devices` local devices (default: all of them)."""
    local = jax.local_devices()
    n = len(local) if devices is None else int(devices)
    if not 1 <= n <= len(local):
        raise ValueError(f"--devices {n}: this process has {len(local)} local device(s) "
                         f"({local[0].platform}); give 1..{len(local)}")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=local[:n])


def round_batch(batch_size: int, num_devices: int) -> int:
    """The smallest multiple of the device count that is >= batch_size (every device gets the same share)."""
    return -(-batch_size // num_devices) * num_devices


@dataclasses.dataclass
class FeatureEncoder:
    """What extraction needs from an encoder: its input contract and a batched feature function."""

    name: str  # the folder name, recorded in the HDF5 attributes
    source: str  # the absolute path it was loaded from
    output: str  # which model output is the feature ("cls" for the GPFM student)
    feature_dim: int
    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dtype: str
    batch_size: int  # global: a multiple of num_devices
    _forward: Callable[[np.ndarray], jax.Array]
    mesh: jax.sharding.Mesh | None = None

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def dispatch(self, tiles: np.ndarray) -> jax.Array:
        """uint8 [n <= batch_size, S, S, 3] -> device float32 [batch_size, D] (padded rows at the end). Async."""
        n = tiles.shape[0]
        if n > self.batch_size or tiles.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"expected <= {self.batch_size} tiles of {self.input_size}x{self.input_size}x3, "
                             f"got {tiles.shape}")
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *tiles.shape[1:]), np.uint8)
            tiles = np.concatenate([tiles, pad])
        return self._forward(tiles)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """Blocking convenience: uint8 [n, S, S, 3] -> float32 [n, D]."""
        return np.asarray(self.dispatch(tiles))[: tiles.shape[0]]

    def attrs(self) -> dict[str, Any]:
        """Provenance for the output files."""
        return {"encoder": self.name, "encoder_path": self.source, "feature": self.output,
                "feature_dim": self.feature_dim, "input_size": self.input_size, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std), "compute_dtype": self.dtype}


def _load_module(path, dtype: str, step: int | None):
    """(module, params, meta) from a bundle (any registered encoder kind) or a training checkpoint's EMA teacher;
    `path` may be a gpfm-train workdir (its checkpoints/ folder is used) and a gs:// URL."""
    try:
        storage.check_reachable(path)
    except storage.StorageError as err:
        raise CheckpointError(f"--encoder {err}") from None
    path = checkpoint_folder(path)
    if not path.is_dir():
        raise CheckpointError(f"--encoder {path}: no such folder (expected an encoder bundle or a training checkpoint)")
    if is_training_checkpoint(path):
        from gpfm_jax.convert.student import load_student_encoder
        from gpfm_jax.models.vit import VisionTransformer

        params, cfg = load_student_encoder(path, step)
        return VisionTransformer(cfg.replace(dtype=dtype)), params, load_meta(path)
    if step is not None:
        raise CheckpointError(f"--encoder {path}: --step given, but this is not a training checkpoint")
    if not (path / "encoder.json").is_file():
        raise CheckpointError(f"--encoder {path}: not an encoder bundle (no encoder.json) nor a training checkpoint; "
                              "convert weights first with tools/convert_from_pytorch.py")
    from gpfm_jax.encoders import load_encoder

    return load_encoder(path, dtype=dtype)


def load_feature_encoder(path: str | Path, *, batch_size: int = 64, dtype: str = "float32",
                         output: str | None = None, step: int | None = None,
                         devices: int | None = None) -> FeatureEncoder:
    """Loads the encoder and compiles its batched forward for (batch_size, S, S, 3) uint8 input over the first
    `devices` local devices (default all); batch_size is rounded up to a multiple of the device count."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    mesh = local_mesh(devices)
    batch_size = round_batch(batch_size, mesh.size)
    path = storage.resolve(path)
    module, params, meta = _load_module(path, dtype, step)
    prep = meta.get("preprocessing") or preprocessing(module.cfg.img_size if hasattr(module, "cfg") else 224)
    size = int(prep["input_size"])
    mean = tuple(float(v) for v in prep.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in prep.get("std", IMAGENET_STD))
    # A teacher bundle names its training target (CONCH: "image_embedding"); the student's feature is "cls".
    output = output or meta.get("feature") or meta.get("targets", {}).get("cls") or "cls"
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(DATA_AXIS))
    params = jax.device_put(params, replicated)

    def forward(p, tiles_uint8):
        x = normalize_pixels(tiles_uint8, mean, std, jnp)
        out = module.apply({"params": p}, x.astype(dtype))
        if output not in out:
            raise KeyError(f"encoder {path.name} has no output {output!r}; it has {sorted(out)}")
        return out[output].astype(jnp.float32)

    probe = jax.eval_shape(forward, params, jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8))
    if len(probe.shape) != 2:
        raise ValueError(f"output {output!r} has shape {probe.shape}; a per-tile feature must be [B, D]")
    jitted = jax.jit(forward, in_shardings=(replicated, split), out_shardings=split)

    def run(tiles: np.ndarray) -> jax.Array:  # the host batch goes straight to its shards (no copy to device 0)
        return jitted(params, jax.device_put(tiles, split))

    return FeatureEncoder(
        name=path.name, source=str(path), output=output, feature_dim=int(probe.shape[1]), input_size=size,
        interpolation=str(prep.get("interpolation", "bicubic")), mean=mean, std=std, dtype=dtype,
        batch_size=batch_size, _forward=run, mesh=mesh)
