"""The modules of GPFM pretraining in one place: student backbone + DINO/iBOT head + distillation heads, the EMA
teacher (same modules, no stochastic depth), and the frozen expert teachers.

Param trees: student `{"backbone", "dino_head", "distill_heads": {teacher: ...}}`; EMA teacher
`{"backbone", "dino_head"}`; experts `{teacher: ...}`. All plain (unboxed) pytrees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpfm_jax.models.heads import DINOHead, DistillHeads
from gpfm_jax.models import crops
from gpfm_jax.models.vit import ViTConfig, VisionTransformer
from gpfm_jax.models.teachers import Teacher, teacher_dims


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    distill_bottleneck_dim: int = 256


@dataclasses.dataclass(frozen=True)
class GPFMModel:
    """Modules only (no params): built once from the config, closed over by the jitted step."""

    vit: ViTConfig
    heads: HeadConfig
    experts: Mapping[str, Teacher]

    @property
    def backbone(self) -> VisionTransformer:
        return VisionTransformer(self.vit)

    @property
    def dino_head(self) -> DINOHead:
        h = self.heads
        return DINOHead(h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers, dtype=self.vit.dtype,
                        param_dtype=self.vit.param_dtype)

    @property
    def distill_heads(self) -> DistillHeads:
        return DistillHeads(teacher_dims(self.experts), self.heads.distill_bottleneck_dim, dtype=self.vit.dtype,
                            param_dtype=self.vit.param_dtype)

    def init_student(self, rng: jax.Array) -> dict[str, Any]:
        """Random student params (DINOv2 init); the EMA teacher starts as a copy of backbone + DINO head."""
        k_backbone, k_head, k_distill = jax.random.split(rng, 3)
        size = self.vit.img_size
        images = jnp.zeros((1, size, size, self.vit.in_chans), jnp.float32)
        tokens = jnp.zeros((1, self.vit.embed_dim), jnp.float32)
        return {
            "backbone": nn.meta.unbox(self.backbone.init(k_backbone, images))["params"],
            "dino_head": nn.meta.unbox(self.dino_head.init(k_head, tokens))["params"],
            # no expert teachers (pure DINOv2 training): no distillation heads, no params
            "distill_heads": nn.meta.unbox(self.distill_heads.init(k_distill, tokens)).get("params", {}),
        }


def ema_subset(student: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the student that the EMA teacher mirrors (the distillation heads are student-only)."""
    return {"backbone": student["backbone"], "dino_head": student["dino_head"]}


def student_forward(backbone: VisionTransformer, params: Mapping[str, Any], global_crops: jax.Array,
                    masks: jax.Array, local_crops: jax.Array, keys: tuple[jax.Array, jax.Array],
                    drop_path: Mapping[str, Any], concat: bool) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The student backbone on the masked global crops and on the local crops (stochastic depth from keys[0] and
    keys[1]): two forwards, or with `concat` one forward whose blocks run both crop sets' tokens through their
    linear layers as one matrix (gpfm_jax/models/crops.py); the same outputs and draws either way."""
    variables = {"params": params}
    if concat:
        rngs = dict(zip(crops.STREAMS, keys))
        s_global, s_local = backbone.apply(variables, (global_crops, local_crops), (masks, None), train=True,
                                           rngs=rngs, **drop_path)
        return s_global, s_local
    s_global = backbone.apply(variables, global_crops, masks, train=True, rngs={"drop_path": keys[0]}, **drop_path)
    s_local = backbone.apply(variables, local_crops, train=True, rngs={"drop_path": keys[1]}, **drop_path)
    return s_global, s_local
