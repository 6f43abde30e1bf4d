"""Encoder bundles: a folder with `encoder.json` (architecture, outputs, preprocessing, provenance) and `params/`
(an orbax checkpoint of the encoder params, unscanned layout). Conversion writes them; training can init from them;
extraction and the teachers read them — no extra flags needed, the JSON says how to build and feed the model.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gpfm_jax.convert.layout import unstack_blocks
from gpfm_jax.convert.torch_io import CheckpointError

BUNDLE_FORMAT = "gpfm_jax.encoder_bundle"
BUNDLE_VERSION = 1
META_FILE = "encoder.json"
PARAMS_DIR = "params"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing(input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bicubic") -> dict:
    """How raw RGB tiles are turned into model input: resize to input_size, scale to [0, 1], normalise."""
    return {"input_size": input_size, "interpolation": interpolation, "mean": list(mean), "std": list(std)}


def is_bundle(directory: str | Path) -> bool:
    return (Path(directory) / META_FILE).is_file()


def save_bundle(directory: str | Path, params: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Writes params + meta into `directory` atomically (a temp folder renamed into place)."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory}: already exists and is not empty")
    for field in ("encoder", "preprocessing"):
        if field not in meta:
            raise ValueError(f"bundle meta lacks the field {field!r}")
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        host_params = jax.tree_util.tree_map(np.asarray, unstack_blocks(params))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, host_params)
        full_meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            directory.rmdir()
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: not an encoder bundle (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path}: invalid JSON: {err}") from err
    if meta.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{meta_path}: format is {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if meta.get("version", 0) > BUNDLE_VERSION:
        raise CheckpointError(f"{meta_path}: bundle version {meta['version']} is newer than this gpfm_jax")
    return meta


def load_bundle(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (params as numpy arrays, unscanned layout; meta)."""
    directory = Path(directory).absolute()
    meta = load_meta(directory)
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory}: bundle has no {PARAMS_DIR}/ folder")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_dir)
    except Exception as err:  # orbax raises many types for damaged folders
        raise CheckpointError(f"{params_dir}: cannot restore the params (incomplete or corrupt?): {err}") from err
    return params, meta
