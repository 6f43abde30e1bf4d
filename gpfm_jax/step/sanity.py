"""The sanity metric: student vs EMA teacher agreement on the batch's unmasked global crops. A collapsing run
(every image to one prototype: teacher entropy -> 0) or a diverging one (student and teacher apart: cosine and
agreement fall) shows here before the loss says so."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpfm_jax.data.batch import GLOBAL_CROPS
from gpfm_jax.data.normalize import normalize_images
from gpfm_jax.step import sharding


def make_sanity_fn(model, schedules, student_temp: float, mesh):
    """`fn(state, batch) -> {name: scalar array}` (dispatched asynchronously): CLS cosine, argmax agreement of the
    DINO prototypes, and the teacher's mean entropy / max probability, for `state` after its last step."""
    backbone, head = model.backbone, model.dino_head
    rules = sharding.logical_rules()

    def fn(params, teacher, centers, global_crops, step):
        with nn.logical_axis_rules(rules):
            x = normalize_images(global_crops.reshape((-1,) + global_crops.shape[2:]), model.vit.dtype)
            s = backbone.apply({"params": params["backbone"]}, x)["cls"].astype(jnp.float32)
            t = backbone.apply({"params": teacher["backbone"]}, x)["cls"].astype(jnp.float32)
            s_logits = head.apply({"params": params["dino_head"]}, s).astype(jnp.float32)
            t_logits = head.apply({"params": teacher["dino_head"]}, t).astype(jnp.float32)
        cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-12)
        tau = schedules.teacher_temp(step)
        t_probs = jax.nn.softmax((t_logits - centers["dino"]) / tau, -1)
        s_probs = jax.nn.softmax(s_logits / student_temp, -1)
        entropy = -jnp.sum(t_probs * jnp.log(t_probs + 1e-12), -1)
        return {
            "sanity/cls_cosine": jnp.mean(cos),
            "sanity/argmax_agreement": jnp.mean(jnp.argmax(s_probs, -1) == jnp.argmax(t_probs, -1)),
            "sanity/teacher_entropy": jnp.mean(entropy),
            "sanity/teacher_max_prob": jnp.mean(jnp.max(t_probs, -1)),
        }

    jitted = jax.jit(fn, out_shardings=sharding.replicated(mesh))

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state.params, state.teacher, state.centers, batch[GLOBAL_CROPS], state.step - 1)

    return run
