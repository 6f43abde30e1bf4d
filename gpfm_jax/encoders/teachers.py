"""Expert teachers from encoder bundles (or tiny random stand-ins): the loading side of `gpfm_jax.models.teachers`.

The training config names teachers and points each at an encoder bundle written by `tools/port_teacher.py`, or at
"standin" (a tiny random teacher with the same interface, for tests and demos):

    teachers, params = load_teachers({"uni": "bundles/uni", "phikon": "bundles/phikon", "conch": "bundles/conch"},
                                     dtype="bfloat16")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from gpfm_jax.convert.bundle import load_bundle
from gpfm_jax.encoders import to_module_layout
from gpfm_jax.models.pooling import PoolerConfig
from gpfm_jax.models.teachers import TEACHERS, Teacher, TeacherSpec, build_teacher, standin_spec
from gpfm_jax.models.vit import COMPUTE_FIELDS, ViTConfig

STANDIN = "standin"


def spec_from_meta(meta: Mapping[str, Any]) -> TeacherSpec:
    """The registry spec of the bundle's teacher, checked against the architecture stored in the bundle."""
    name = meta.get("teacher")
    if name not in TEACHERS:
        raise ValueError(f"bundle is not a teacher bundle of a known teacher (teacher={name!r}; known {sorted(TEACHERS)})")
    spec = TEACHERS[name]
    stored = ViTConfig.from_dict(meta["vit"])
    arch = {k: v for k, v in stored.to_dict().items() if k not in COMPUTE_FIELDS}
    expected = {k: v for k, v in spec.vit.to_dict().items() if k not in COMPUTE_FIELDS}
    diff = sorted(k for k in expected if arch[k] != expected[k])
    if diff:
        raise ValueError(f"bundle of teacher {name!r} has a different architecture than the registry: {diff}")
    stored_pooler = PoolerConfig.from_dict(meta["pooler"]) if meta.get("pooler") else None
    if stored_pooler != spec.pooler:
        raise ValueError(f"bundle of teacher {name!r} has pooler {stored_pooler}, registry says {spec.pooler}")
    return spec


def load_teacher(name: str, bundle: str | Path | None, seed: int = 0, **overrides: Any) -> tuple[Teacher, Any]:
    """(Teacher, params in the module's layout) from a bundle folder, or a random stand-in if bundle is None/"standin"."""
    if bundle is None or str(bundle) == STANDIN:
        teacher = build_teacher(standin_spec(name), **overrides)
        return teacher, teacher.init_params(seed)
    params, meta = load_bundle(bundle)
    spec = spec_from_meta(meta)
    if spec.name != name:
        raise ValueError(f"{bundle}: this bundle holds the {spec.name!r} teacher, but it is configured as {name!r}")
    teacher = build_teacher(spec, **overrides)
    params = to_module_layout(teacher.module, params)
    dtype = teacher.spec.vit.param_dtype
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    return teacher, params


def load_teachers(
    bundles: Mapping[str, str | Path | None], seed: int = 0, **overrides: Any
) -> tuple[dict[str, Teacher], dict[str, Any]]:
    """{name: bundle dir or "standin"} -> ({name: Teacher}, {name: params}). Order is kept."""
    teachers, params = {}, {}
    for i, (name, bundle) in enumerate(bundles.items()):
        teachers[name], params[name] = load_teacher(name, bundle, seed + i, **overrides)
    return teachers, params
