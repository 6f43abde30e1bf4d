"""A training checkpoint folder doubles as an encoder bundle: `encoder.json` next to the step folders describes the
student ViT (its EMA teacher backbone is what `tools/convert_to_pytorch.py` and `gpfm-extract` load), and
`config.init_from` starts a run from an encoder bundle's backbone."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath

from gpfm_jax import storage
from gpfm_jax.convert import checkpoint_layout
from gpfm_jax.convert.bundle import META_FILE, load_bundle, with_format
from gpfm_jax.convert.layout import to_layout
from gpfm_jax.convert.student import student_meta
from gpfm_jax.models.vit import COMPUTE_FIELDS, ViTConfig


def encoder_meta(vit: ViTConfig, source: str = "gpfm-train") -> dict[str, Any]:
    """The bundle meta of the student encoder (inference settings: fp32, unscanned, no stochastic depth)."""
    arch = vit.replace(drop_path_rate=0.0, scan_layers=False, remat_policy="none", dtype="float32",
                       param_dtype="float32")
    params = f"{checkpoint_layout.teacher_backbone_path()} (EMA teacher)"
    return with_format(student_meta(arch, vit.img_size, {"source": source, "params": params}))


def write_encoder_meta(directory: storage.PathLike, vit: ViTConfig) -> epath.Path:
    """`<directory>/encoder.json`, written whole (a local or a bucket folder)."""
    path = storage.resolve(directory) / META_FILE
    storage.write_text_atomic(path, json.dumps(encoder_meta(vit), indent=2, sort_keys=True) + "\n")
    return path


def load_init_backbone(bundle: storage.PathLike, vit: ViTConfig, abstract_backbone: Any) -> dict[str, Any]:
    """Backbone params of an encoder bundle, checked against the student architecture and put in its layout."""
    params, meta = load_bundle(bundle)
    if meta.get("encoder") != "vit":
        raise ValueError(f"config.init_from={str(bundle)!r}: encoder kind {meta.get('encoder')!r} is not a ViT")
    stored = ViTConfig.from_dict(meta["vit"]).to_dict()
    expected = vit.to_dict()
    diff = sorted(k for k in expected if k not in COMPUTE_FIELDS and stored.get(k) != expected[k])
    if diff:
        raise ValueError(f"config.init_from={str(bundle)!r}: the bundle's ViT differs from config.model.vit in "
                         + ", ".join(f"{k} ({stored.get(k)!r} vs {expected[k]!r})" for k in diff))
    params = to_layout(dict(params), vit.scan_layers)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(abstract_backbone)[0])
    flat_have = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    want = {jax.tree_util.keystr(k): v.shape for k, v in flat_want.items()}
    have = {jax.tree_util.keystr(k): np.shape(v) for k, v in flat_have.items()}
    if want != have:
        bad = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise ValueError(f"config.init_from={str(bundle)!r}: params do not fit the student: {bad[:8]}")
    dtype = jax.numpy.dtype(vit.param_dtype)
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), params)
