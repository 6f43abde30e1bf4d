"""The frozen expert teachers of GPFM (UNI, Phikon, CONCH) as models: the registry, the modules, the targets.

Every teacher is the one `VisionTransformer` of `gpfm_jax.models.vit`, configured (CONCH adds the attentional pool
head of `gpfm_jax.models.pooling`). The registry `TEACHERS` maps a name to a `TeacherSpec`: architecture, which
output is the CLS target and which the patch target, their widths (the distillation heads' output dims), the source
checkpoint format and the teacher's own preprocessing. Loading teachers from encoder bundles (or "standin") is
`gpfm_jax.encoders.teachers`; this module reads no files, so the converters can use the registry without depending
on the layer above them.

    targets = teacher_targets(teachers, params, global_crops)   # inside the jitted train step
    # {"uni": {"cls": [B, 1024], "patch": [B, 256, 1024]}, "phikon": {...768}, "conch": {"cls": [B, 512]}}

All teachers get the student's augmented, ImageNet-normalised 224x224 global crops as they are (SPEC: no per-teacher
resize or re-normalisation); the 14x14 teacher patch grids are upsampled to the student grid with PyTorch's bicubic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpfm_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from gpfm_jax.models.pooling import PooledViT, PoolerConfig
from gpfm_jax.models.vit import COMPUTE_FIELDS, ViTConfig, VisionTransformer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # conch.open_clip_custom.constants
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Outputs of `PooledViT` whose width is the pooler's (not the trunk's).
_POOLER_OUTPUTS = ("pooled", "projected", "image_embedding")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """Everything the training step and the porting tool need to know about one teacher."""

    name: str
    vit: ViTConfig
    pooler: PoolerConfig | None = None
    cls_output: str = "cls"  # module output used as the CLS target
    patch_output: str | None = "patch"  # module output used as the patch target (None: no patch target)
    source_format: str = "timm_vit"  # see gpfm_jax.convert.teacher_keys.FORMATS
    reference: str = ""  # the PyTorch code this reproduces
    native_size: int = 224
    native_mean: tuple[float, float, float] = IMAGENET_MEAN
    native_std: tuple[float, float, float] = IMAGENET_STD
    fixed_input_size: int | None = None  # the reference refuses other input sizes (HF ViT without interpolation)

    def __post_init__(self):
        if self.cls_output in _POOLER_OUTPUTS and self.pooler is None:
            raise ValueError(f"teacher {self.name}: CLS output {self.cls_output!r} needs a pooler")

    @property
    def encoder_kind(self) -> str:
        return "vit" if self.pooler is None else "vit_attnpool"

    @property
    def cls_dim(self) -> int:
        if self.cls_output in _POOLER_OUTPUTS:
            return self.pooler.dim if self.cls_output == "pooled" else self.pooler.out_dim
        return self.vit.embed_dim

    @property
    def patch_dim(self) -> int | None:
        return None if self.patch_output is None else self.vit.embed_dim

    @property
    def outputs(self) -> dict[str, int]:
        out = {"cls": self.vit.embed_dim, "patch": self.vit.embed_dim, "tokens": self.vit.embed_dim}
        if self.pooler is not None:
            out.update(pooled=self.pooler.dim, projected=self.pooler.out_dim, image_embedding=self.pooler.out_dim)
        return out

    def replace(self, **changes: Any) -> "TeacherSpec":
        return dataclasses.replace(self, **changes)


TEACHERS: dict[str, TeacherSpec] = {
    "uni": TeacherSpec(
        name="uni",
        vit=ViTConfig(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, layerscale_init=1e-5,
                      ln_eps=1e-6, use_mask_token=False, pos_embed_rule="timm"),
        source_format="timm_vit",
        reference="timm.create_model('vit_large_patch16_224', img_size=224, patch_size=16, init_values=1e-5, "
                  "num_classes=0, dynamic_img_size=True).forward_features",
    ),
    "phikon": TeacherSpec(
        name="phikon",
        vit=ViTConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, layerscale_init=None,
                      ln_eps=1e-12, use_mask_token=False, pos_embed_rule="timm"),
        source_format="hf_vit",
        reference="transformers.ViTModel (ViT-B/16, layer_norm_eps 1e-12).last_hidden_state; pooler unused",
        fixed_input_size=224,
    ),
    "conch": TeacherSpec(
        name="conch",
        vit=ViTConfig(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, layerscale_init=None,
                      ln_eps=1e-6, use_mask_token=False, pos_embed_rule="timm"),
        pooler=PoolerConfig(dim=512, context_dim=768, num_heads=8, num_queries=1, ln_eps=1e-5, proj_dim=512),
        cls_output="image_embedding",
        patch_output=None,
        source_format="conch_coca",
        reference="conch.open_clip_custom CoCa('conch_ViT-B-16').encode_image(x) (proj_contrast, L2-normalised)",
        native_size=448,
        native_mean=OPENAI_CLIP_MEAN,
        native_std=OPENAI_CLIP_STD,
    ),
}


def teacher_spec(name: str) -> TeacherSpec:
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; known: {sorted(TEACHERS)}")
    return TEACHERS[name]


def standin_spec(name: str, embed_dim: int = 64, depth: int = 2, num_heads: int = 4, pooler_dim: int = 32) -> TeacherSpec:
    """A tiny random teacher with the same structure and output interface as `name` (smaller widths); it takes any
    input size (the reference's fixed input size belongs to the real model, not to the stand-in)."""
    spec = teacher_spec(name)
    vit = spec.vit.replace(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           layerscale_init=None if spec.vit.layerscale_init is None else 0.1)
    pooler = None
    if spec.pooler is not None:
        pooler = spec.pooler.replace(dim=pooler_dim, context_dim=embed_dim, num_heads=num_heads,
                                     proj_dim=None if spec.pooler.proj_dim is None else pooler_dim)
    return spec.replace(vit=vit, pooler=pooler, reference=f"random stand-in for {name}", fixed_input_size=None)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A built teacher: its spec and the Flax module (compute settings applied)."""

    spec: TeacherSpec
    module: nn.Module

    def apply(self, params: Any, images: jax.Array) -> dict[str, jax.Array]:
        size = self.spec.fixed_input_size
        if size is not None and images.shape[1:3] != (size, size):
            raise ValueError(f"teacher {self.spec.name} takes {size}x{size} input only (as its reference), "
                             f"got {images.shape[1]}x{images.shape[2]}")
        return self.module.apply({"params": params}, images)

    def init_params(self, seed: int = 0) -> dict[str, Any]:
        """Random params (stand-ins, benchmarks); see `random_params`."""
        size = self.spec.fixed_input_size or 224
        return random_params(self.module, (1, size, size, self.spec.vit.in_chans), seed, self.spec.vit.param_dtype)


def random_params(module: nn.Module, input_shape: tuple[int, ...], seed: int = 0, dtype: str = "float32") -> dict:
    """Random params of a ViT / PooledViT filled with numpy from the param shapes (no compile): LayerNorm scale 1,
    biases 0, LayerScale gammas 0.1, the pooler projection N(0, 1/dim), everything else N(0, 0.02)."""
    images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), images))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        parent = path[-2].key if len(path) > 1 else ""
        if name == "scale":
            value = np.ones(leaf.shape, np.float32)
        elif name == "bias":
            value = np.zeros(leaf.shape, np.float32)
        elif name == "gamma":
            value = np.full(leaf.shape, 0.1, np.float32)
        elif name == "proj" and parent == "pooler":
            value = rng.standard_normal(leaf.shape, np.float32) * leaf.shape[0] ** -0.5
        else:
            value = 0.02 * rng.standard_normal(leaf.shape, np.float32)
        return jnp.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def build_teacher(spec: TeacherSpec, **overrides: Any) -> Teacher:
    """Module for `spec` with ViTConfig compute overrides (dtype, param_dtype, scan_layers, remat_policy)."""
    unknown = sorted(set(overrides) - set(COMPUTE_FIELDS))
    if unknown:
        raise ValueError(f"only compute settings {COMPUTE_FIELDS} may be overridden, got {unknown}")
    vit = spec.vit.replace(**overrides)
    module = VisionTransformer(vit) if spec.pooler is None else PooledViT(vit, spec.pooler)
    return Teacher(spec.replace(vit=vit), module)


def teacher_dims(teachers: Mapping[str, Teacher | TeacherSpec]) -> dict[str, int]:
    """Output dims of the distillation heads (the same head maps CLS and patches, so both targets share it)."""
    dims = {}
    for name, t in teachers.items():
        spec = t.spec if isinstance(t, Teacher) else t
        if spec.patch_dim is not None and spec.patch_dim != spec.cls_dim:
            raise ValueError(f"teacher {name}: CLS dim {spec.cls_dim} != patch dim {spec.patch_dim}")
        dims[name] = spec.cls_dim
    return dims


def upsample_patch_tokens(tokens: jax.Array, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> jax.Array:
    """[B, h*w, D] -> [B, gh*gw, D] (row-major grids), in f32 with PyTorch's bicubic:
    `F.interpolate(x, size=dst_grid, mode='bicubic', align_corners=False)` (a = -0.75, no antialias)."""
    b, n, d = tokens.shape
    if n != src_grid[0] * src_grid[1]:
        raise ValueError(f"{n} tokens do not form a {src_grid[0]}x{src_grid[1]} grid")
    x = tokens.astype(jnp.float32).reshape(b, src_grid[0], src_grid[1], d)
    if tuple(src_grid) != tuple(dst_grid):
        x = jax.image.resize(x, (b, dst_grid[0], dst_grid[1], d), method=jax.image.ResizeMethod.CUBIC_PYTORCH,
                             antialias=False)
    return x.reshape(b, dst_grid[0] * dst_grid[1], d)


def teacher_targets(
    teachers: Mapping[str, Teacher],
    params: Mapping[str, Any],
    global_crops: jax.Array,
    student_grid: tuple[int, int] = (16, 16),
) -> dict[str, dict[str, jax.Array]]:
    """The distillation targets for the student's unmasked global crops f32[B, H, W, 3] (ImageNet-normalised, NHWC).

    Returns {name: {"cls": f32[B, D_t], "patch": f32[B, gh*gw, D_t]}} ("patch" only for teachers with a patch
    target, upsampled from the teacher grid to `student_grid`). Each teacher computes in its module's dtype
    (`build_teacher(..., dtype="bfloat16")`); targets come back in f32, under stop_gradient. Call inside jit.
    """
    out = {}
    for name, teacher in teachers.items():
        spec = teacher.spec
        frozen = jax.lax.stop_gradient(params[name])
        images = jax.lax.stop_gradient(global_crops).astype(spec.vit.dtype)
        outputs = teacher.apply(frozen, images)
        targets = {"cls": outputs[spec.cls_output].astype(jnp.float32)}
        if spec.patch_output is not None:
            p = spec.vit.patch_size
            src = (global_crops.shape[1] // p, global_crops.shape[2] // p)
            targets["patch"] = upsample_patch_tokens(outputs[spec.patch_output], src, tuple(student_grid))
        out[name] = jax.tree_util.tree_map(jax.lax.stop_gradient, targets)
    return out


def split_targets(targets: Mapping[str, Mapping[str, jax.Array]]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """-> (cls_targets, patch_targets) as `gpfm_jax.losses.total.distill_terms` takes them."""
    cls_t = {k: v["cls"] for k, v in targets.items()}
    patch_t = {k: v["patch"] for k, v in targets.items() if "patch" in v}
    return cls_t, patch_t


def cast_params(params: Any, dtype: str) -> Any:
    """Teacher params stored in another dtype (e.g. bf16 on accelerators, halving their memory)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
