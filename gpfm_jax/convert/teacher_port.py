"""Expert teacher checkpoint (the user's own PyTorch file) -> encoder bundle. Used by `tools/port_teacher.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpfm_jax.convert import teacher_keys
from gpfm_jax.convert.bundle import preprocessing, save_bundle
from gpfm_jax.convert.torch_io import file_sha256, load_torch_file
from gpfm_jax.models.teachers import TeacherSpec, teacher_spec

TRAINING_INPUT_NOTE = (
    "GPFM feeds every teacher the student's augmented, ImageNet-normalised 224x224 global crops as they are (no "
    "per-teacher resize or re-normalisation); 'preprocessing' is the teacher's own, for standalone feature extraction"
)
FILE_KINDS = {
    "timm_vit": "UNI pytorch_model.bin (timm state dict)",
    "hf_vit": "Phikon model.safetensors or pytorch_model.bin (Hugging Face ViTModel)",
    "conch_coca": "CONCH pytorch_model.bin (whole CoCa model)",
}


def import_teacher(name: str, torch_path: str | Path) -> tuple[dict[str, Any], TeacherSpec, list[str]]:
    """(unscanned Flax params, spec, ignored source keys). Strict: see gpfm_jax.convert.teacher_keys."""
    spec = teacher_spec(name)
    source = str(torch_path)
    state = teacher_keys.strip_wrappers(load_torch_file(torch_path), source)
    teacher_keys.check_format(state, spec.source_format, name, source)
    if spec.source_format == "timm_vit":
        params, ignored = teacher_keys.timm_vit_params(state, spec.vit, source)
    elif spec.source_format == "hf_vit":
        params, ignored = teacher_keys.hf_vit_params(state, spec.vit, source)
    elif spec.source_format == "conch_coca":
        params, ignored = teacher_keys.conch_params(state, spec.vit, spec.pooler, source)
    else:
        raise ValueError(f"teacher {name}: unknown source format {spec.source_format!r}")
    return params, spec, ignored


def teacher_meta(spec: TeacherSpec, provenance: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "encoder": spec.encoder_kind,
        "teacher": spec.name,
        "vit": spec.vit.to_dict(),
        "outputs": spec.outputs,
        "targets": {"cls": spec.cls_output, "patch": spec.patch_output},
        "target_dims": {"cls": spec.cls_dim, "patch": spec.patch_dim},
        "preprocessing": preprocessing(spec.native_size, spec.native_mean, spec.native_std),
        "fixed_input_size": spec.fixed_input_size,
        "training_input": TRAINING_INPUT_NOTE,
        "reference": spec.reference,
        "provenance": provenance,
    }
    if spec.pooler is not None:
        meta["pooler"] = spec.pooler.to_dict()
    return meta


def port_teacher(name: str, torch_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Writes the encoder bundle of teacher `name` from its PyTorch file; returns the bundle meta."""
    torch_path = Path(torch_path)
    params, spec, ignored = import_teacher(name, torch_path)
    provenance = {
        "source": torch_path.name,
        "sha256": file_sha256(torch_path),
        "source_format": spec.source_format,
        "ignored_keys": teacher_keys.summarize_ignored(ignored, spec.source_format),
    }
    meta = teacher_meta(spec, provenance)
    save_bundle(out_dir, params, meta)
    return meta
