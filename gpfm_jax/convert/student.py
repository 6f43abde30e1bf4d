"""GPFM student / timm DINOv2 ViT conversion: PyTorch file <-> encoder bundle, and training checkpoint -> PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from gpfm_jax import storage
from gpfm_jax.convert import checkpoint_layout, vit_keys
from gpfm_jax.convert.bundle import META_FILE, load_bundle, load_meta, preprocessing, save_bundle
from gpfm_jax.convert.layout import unstack_blocks
from gpfm_jax.convert.torch_io import CheckpointError, file_sha256, load_torch_file, save_torch_file
from gpfm_jax.models.vit import ViTConfig

# Named architectures a user can require with --arch (the file must then match exactly).
ARCHS: dict[str, ViTConfig] = {
    "vit_small_patch14": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14": ViTConfig(),  # GPFM
    "vit_giant_patch14": ViTConfig(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu", mlp_ratio=4.0),
}
EXPORT_FORMATS = ("timm", "gpfm")


def read_vit_state(torch_path: str | Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Any supported file (GPFM release, bare timm/DINOv2 dict, safetensors) -> (canonical state, ignored keys)."""
    source = str(torch_path)
    state = vit_keys.unwrap_state(load_torch_file(torch_path), source)
    return vit_keys.canonical_keys(state, source)


def import_vit(torch_path: str | Path, arch: str | None = None, **overrides: Any) -> tuple[dict, ViTConfig, list[str]]:
    """PyTorch file -> (unscanned Flax params, config, ignored keys). `arch` pins the expected architecture."""
    source = str(torch_path)
    state, ignored = read_vit_state(torch_path)
    if arch is not None:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
        cfg = ARCHS[arch].replace(**overrides)
    else:
        cfg = vit_keys.infer_vit_config(state, source, **overrides)
    params = vit_keys.vit_params_from_torch(state, cfg, source)
    return params, cfg, ignored


def student_meta(vit: ViTConfig, input_size: int, provenance: dict[str, Any]) -> dict[str, Any]:
    """The encoder bundle meta of a ViT student: what `convert_from_pytorch` writes next to converted weights and
    gpfm-train writes as its checkpoints' encoder.json (train/encoder_meta.py), so both read back the same way."""
    return {"encoder": "vit", "vit": vit.to_dict(), "outputs": {"cls": vit.embed_dim, "patch": vit.embed_dim},
            "preprocessing": preprocessing(input_size), "provenance": provenance}


def convert_from_pytorch(torch_path: str | Path, out_dir: str | Path, arch: str | None = None, **overrides) -> dict:
    """Writes an encoder bundle for a PyTorch ViT file; returns the bundle meta."""
    torch_path = Path(torch_path)
    params, cfg, ignored = import_vit(torch_path, arch, **overrides)
    meta = student_meta(cfg, 224, {
        "source": torch_path.name,
        "sha256": file_sha256(torch_path),
        "ignored_keys": sorted({k.split(".")[0] + ".*" for k in ignored}),
    })
    save_bundle(out_dir, params, meta)
    return meta


def is_training_checkpoint(directory: epath.Path) -> bool:
    """A gpfm-train checkpoint folder: encoder.json next to numbered orbax step folders."""
    return any(p.name.isdigit() and p.is_dir() for p in directory.iterdir()) and (directory / META_FILE).is_file()


def checkpoint_folder(path: storage.PathLike) -> epath.Path:
    """`path` itself, or `<path>/checkpoints` when `path` is a gpfm-train workdir (what users type: runs/demo)."""
    path = storage.resolve(path)
    inner = path / checkpoint_layout.CHECKPOINT_DIR
    if not (path / META_FILE).is_file() and (inner / META_FILE).is_file():
        return inner
    return path


def load_student_encoder(checkpoint: storage.PathLike, step: int | None = None) -> tuple[dict, ViTConfig]:
    """(unscanned params, config) from an encoder bundle, or from a training checkpoint's EMA teacher backbone.

    A training checkpoint is a `gpfm-train` workdir checkpoint folder: `encoder.json` (the student architecture) next
    to orbax step folders whose state tree holds the EMA teacher backbone (`checkpoint_layout`: what the official
    release ships); the workdir itself is accepted too. Any of them may be a gs:// URL.
    """
    try:
        storage.check_reachable(checkpoint)
    except storage.StorageError as err:
        raise CheckpointError(str(err)) from None
    checkpoint = checkpoint_folder(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such folder")
    if is_training_checkpoint(checkpoint):
        meta = load_meta(checkpoint)
        params = _restore_teacher_backbone(checkpoint, step)
    else:
        if step is not None:
            raise CheckpointError(f"{checkpoint}: --step given, but this is an encoder bundle, not a training checkpoint")
        params, meta = load_bundle(checkpoint)
    if meta.get("encoder") != "vit":
        raise CheckpointError(f"{checkpoint}: encoder kind {meta.get('encoder')!r} is not a ViT student")
    return unstack_blocks(params), ViTConfig.from_dict(meta["vit"])


def _restore_teacher_backbone(directory: epath.Path, step: int | None) -> dict:
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory) as manager:  # all_steps(): finished steps only (commit marker on gs://)
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{directory}: no finished checkpoint steps")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"{directory}: no step {step}; available: {sorted(steps)}")
        # The writer's devices (8 GPUs, 2 hosts) are not this machine's: restore everything onto one local device.
        local = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        item = checkpoint_layout.STATE
        restored = manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(fallback_sharding=local)}))
    try:
        return checkpoint_layout.teacher_backbone(restored[item])
    except KeyError as err:
        where = "/".join(checkpoint_layout.TEACHER_BACKBONE)
        raise CheckpointError(f"{directory}/{step}: the state has no {where} params") from err


def export_state(params: dict, cfg: ViTConfig, fmt: str) -> dict[str, Any]:
    """Flax params -> the PyTorch state in `fmt` ('timm': bare keys; 'gpfm': the official {'teacher': ...})."""
    canonical = vit_keys.vit_params_to_torch(unstack_blocks(params), cfg)
    if fmt == "timm":
        return vit_keys.to_timm_state(canonical)
    if fmt == "gpfm":
        return vit_keys.to_gpfm_state(canonical, cfg.depth)
    raise ValueError(f"unknown format {fmt!r}; expected one of {EXPORT_FORMATS}")


def convert_to_pytorch(checkpoint: str | Path, out_path: str | Path, fmt: str, step: int | None = None) -> Path:
    out_path = Path(out_path)
    if fmt == "gpfm" and out_path.suffix == ".safetensors":
        raise ValueError("the gpfm format is a nested {'teacher': ...} dict: write it as .pth, not .safetensors")
    params, cfg = load_student_encoder(checkpoint, step)
    save_torch_file(export_state(params, cfg, fmt), out_path)
    return out_path
