"""Safe reading and writing of PyTorch weight files (.pth/.pt/.bin pickles and .safetensors).

Pickles are opened with `torch.load(weights_only=True)`, which refuses any object that would run code, so a
checkpoint can never execute anything here. Tensors come back as numpy arrays with their exact dtype and bits.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointError(ValueError):
    """A weight file that cannot be used: unreadable, unsafe, or not the architecture it should be."""


def _require_torch():
    try:
        import torch
    except ImportError as err:  # torch is an extra, not a training dependency
        raise ImportError('reading PyTorch files needs the torch extra: pip install "gpfm_jax[torch]"') from err
    return torch


def file_sha256(path: Path) -> str:
    """Provenance of a converted file (recorded in bundles)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """Exact copy of a torch tensor (bf16 becomes ml_dtypes.bfloat16 with the same bits)."""
    torch = _require_torch()
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def numpy_to_tensor(array: np.ndarray) -> Any:
    torch = _require_torch()
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _tree_to_numpy(obj: Any, where: str) -> Any:
    torch = _require_torch()
    if isinstance(obj, torch.Tensor):
        return tensor_to_numpy(obj)
    if isinstance(obj, Mapping):
        return {str(k): _tree_to_numpy(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    return obj  # ints, strings, lists in training checkpoints: kept, callers decide what to use


def load_torch_file(path: str | Path) -> dict[str, Any]:
    """Reads a .pth/.pt/.bin or .safetensors file into (nested) dicts of numpy arrays. Never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
        return {k: tensor_to_numpy(v) for k, v in tensors.items()}
    torch = _require_torch()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors and plain containers "
            f"(weights_only=True would have to run code to load it): {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch file (truncated or corrupt?): {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return _tree_to_numpy(obj, "")


def save_torch_file(state: Mapping[str, Any], path: str | Path) -> None:
    """Writes nested dicts of numpy arrays as .pth (torch.save) or a flat dict as .safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch = _require_torch()

    def to_torch(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return numpy_to_tensor(obj)
        if isinstance(obj, Mapping):
            return {k: to_torch(v) for k, v in obj.items()}
        return obj

    tensors = to_torch(state)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        nested = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if nested:
            raise CheckpointError(f"{path}: safetensors holds a flat dict of tensors; {nested[0]!r} is not a tensor")
        save_file(tensors, str(tmp))
    else:
        torch.save(tensors, str(tmp))
    tmp.replace(path)  # never leave a half-written file under the final name
