"""Encoder bundles: a folder with `encoder.json` (architecture, outputs, preprocessing, provenance) and `params/`
(an orbax checkpoint of the encoder params, unscanned layout). Conversion writes them; training can init from them;
extraction and the teachers read them — no extra flags needed, the JSON says how to build and feed the model.
A bundle may live in a bucket (gs://): orbax reads and writes the params there, and `encoder.json` is written last,
so a bundle whose upload was cut short has no meta and is refused as "not an encoder bundle".
"""

from __future__ import annotations

import json
import shutil
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gpfm_jax import storage
from gpfm_jax.convert.layout import unstack_blocks
from gpfm_jax.convert.torch_io import CheckpointError
from gpfm_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD

BUNDLE_FORMAT = "gpfm_jax.encoder_bundle"
BUNDLE_VERSION = 1
META_FILE = "encoder.json"
PARAMS_DIR = "params"


def preprocessing(input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bicubic") -> dict:
    """How raw RGB tiles are turned into model input: resize to input_size, scale to [0, 1], normalise."""
    return {"input_size": input_size, "interpolation": interpolation, "mean": list(mean), "std": list(std)}


def with_format(meta: dict[str, Any]) -> dict[str, Any]:
    """The meta as written to encoder.json: the bundle format and version first."""
    return {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **meta}


def is_bundle(directory: storage.PathLike) -> bool:
    return (storage.resolve(directory) / META_FILE).is_file()


def save_bundle(directory: storage.PathLike, params: dict[str, Any], meta: dict[str, Any]) -> epath.Path:
    """Writes params + meta into `directory` atomically: locally a temp folder renamed into place; in a bucket
    (no rename) the params first and `encoder.json` last, which is what makes it a bundle."""
    directory = storage.resolve(directory)
    storage.check_reachable(directory)  # a missing bucket: one line, not a client's retries
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory}: already exists and is not empty")
    for field in ("encoder", "preprocessing"):
        if field not in meta:
            raise ValueError(f"bundle meta lacks the field {field!r}")
    full_meta = with_format(meta)
    host_params = jax.tree_util.tree_map(np.asarray, unstack_blocks(params))
    if storage.is_url(directory):
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(directory / PARAMS_DIR, host_params)
        storage.write_text_atomic(directory / META_FILE, json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        return directory
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, host_params)
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            directory.rmdir()
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_meta(directory: storage.PathLike) -> dict[str, Any]:
    directory = storage.resolve(directory)
    try:
        storage.check_reachable(directory)
    except storage.StorageError as err:
        raise CheckpointError(str(err)) from None
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


def load_bundle(directory: storage.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (params as numpy arrays, unscanned layout; meta). `directory` may be a gs:// URL."""
    directory = storage.resolve(directory)
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
