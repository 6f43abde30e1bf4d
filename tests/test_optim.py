"""Schedules (closed forms), layer-wise LR decay on the real ViT-L tree, WD mask, frozen last layers, per-module
clipping, the full optimiser update against a hand-written AdamW step, and the EMA update."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpfm_jax.models.heads import DINOHead, DistillHeads
from gpfm_jax.models.vit import ViTConfig, VisionTransformer
from gpfm_jax.step import optim
from gpfm_jax.step.schedules import ScheduleConfig, make_schedules, peak_lr, schedule_values

TOL = dict(rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------ schedules


def test_lr_schedule_closed_form():
    cfg = ScheduleConfig()
    s = make_schedules(cfg, global_batch_size=1536)
    peak = 4e-4 * math.sqrt(1536 / 1024)
    assert peak_lr(cfg, 1536) == pytest.approx(peak)
    lr = lambda t: float(s.lr(t))
    assert lr(0) == 0.0
    assert lr(25_000) == pytest.approx(peak * 25_000 / 49_999, rel=1e-5)  # np.linspace(0, peak, 50_000)
    assert lr(49_999) == pytest.approx(peak, rel=1e-5)  # end of warmup
    assert lr(50_000) == pytest.approx(peak, rel=1e-5)  # cosine starts at the peak
    assert lr(275_000) == pytest.approx((peak + 1e-6) / 2, rel=1e-5)  # middle of the cosine
    k = 400_000 - 50_000
    assert lr(400_000) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * k / 450_000)), rel=1e-4)
    assert lr(500_000) == pytest.approx(1e-6) and lr(10**7) == pytest.approx(1e-6)


def test_other_schedules_closed_form():
    s = make_schedules(ScheduleConfig(), global_batch_size=1024)
    assert float(s.weight_decay(0)) == pytest.approx(0.04)
    assert float(s.weight_decay(250_000)) == pytest.approx(0.22, rel=1e-5)
    assert float(s.weight_decay(500_000)) == pytest.approx(0.4)
    assert float(s.momentum(0)) == pytest.approx(0.992)
    assert float(s.momentum(250_000)) == pytest.approx(0.996, rel=1e-6)
    assert float(s.momentum(500_000)) == pytest.approx(1.0)
    assert float(s.teacher_temp(0)) == pytest.approx(0.04)
    assert float(s.teacher_temp(10_000)) == pytest.approx(0.04 + 0.03 * 10_000 / 37_499, rel=1e-6)
    assert float(s.teacher_temp(37_499)) == pytest.approx(0.07)
    assert float(s.teacher_temp(37_500)) == pytest.approx(0.07) and float(s.teacher_temp(200_000)) == pytest.approx(0.07)
    assert float(s.last_layer_lr(1_249)) == 0.0
    assert float(s.last_layer_lr(1_250)) == pytest.approx(float(s.lr(1_250))) and float(s.lr(1_250)) > 0
    metrics = jax.jit(lambda t: schedule_values(s, t))(jnp.asarray(250_000))
    assert sorted(metrics) == ["schedule/last_layer_lr", "schedule/lr", "schedule/momentum",
                               "schedule/teacher_temp", "schedule/weight_decay"]
    assert float(metrics["schedule/weight_decay"]) == pytest.approx(0.22, rel=1e-5)


# -------------------------------------------------------------------------------------------- param groups


def _student_shapes(scan_layers: bool):
    """The real GPFM student tree, shapes only: ViT-L/14 + DINO head + three distillation heads."""
    vit = VisionTransformer(ViTConfig(scan_layers=scan_layers))

    def init():
        key = jax.random.key(0)
        backbone = vit.init(key, jnp.zeros((1, 224, 224, 3)))["params"]
        dino = DINOHead().init(key, jnp.zeros((1, 1024)))["params"]
        distill = DistillHeads({"uni": 1024, "phikon": 768, "conch": 512}).init(key, jnp.zeros((1, 1024)))["params"]
        return nn.meta.unbox({"backbone": backbone, "dino_head": dino, "distill_heads": distill})

    return jax.eval_shape(init)


@pytest.fixture(scope="module")
def vitl_tree():
    return _student_shapes(scan_layers=False)


def test_layer_decay_multipliers_vitl(vitl_tree):
    m = optim.lr_multipliers(vitl_tree)
    b = m["backbone"]
    assert b["blocks_0"]["attn"]["qkv"]["kernel"] == pytest.approx(0.9**24)
    assert b["blocks_11"]["mlp"]["fc1"]["bias"] == pytest.approx(0.9**13)
    assert b["blocks_23"]["ls2"]["gamma"] == pytest.approx(0.9**1)
    assert b["patch_embed"]["proj"]["kernel"] == pytest.approx(0.9**25 * 0.2)
    for k in ("pos_embed", "cls_token", "mask_token"):
        assert b[k] == pytest.approx(0.9**25)
    assert b["norm"]["scale"] == 1.0
    assert set(jax.tree_util.tree_leaves(m["dino_head"])) == {1.0}
    assert set(jax.tree_util.tree_leaves(m["distill_heads"])) == {1.0}


def test_layer_decay_multipliers_scanned_layout():
    tree = _student_shapes(scan_layers=True)
    m = optim.lr_multipliers(tree)
    qkv = m["backbone"]["blocks"]["attn"]["qkv"]["kernel"]
    assert tree["backbone"]["blocks"]["attn"]["qkv"]["kernel"].shape == (24, 1024, 3072)
    assert qkv.shape == (24, 1, 1)
    np.testing.assert_allclose(qkv[[0, 11, 23], 0, 0], [0.9**24, 0.9**13, 0.9**1], rtol=1e-6)
    assert m["backbone"]["blocks"]["norm1"]["scale"].shape == (24, 1)
    assert m["backbone"]["patch_embed"]["proj"]["bias"] == pytest.approx(0.9**25 * 0.2)


def test_weight_decay_and_last_layer_masks(vitl_tree):
    wd = optim.weight_decay_mask(vitl_tree)
    b = wd["backbone"]
    assert b["blocks_3"]["attn"]["qkv"]["kernel"] and b["patch_embed"]["proj"]["kernel"]
    assert b["pos_embed"] and b["cls_token"] and b["mask_token"]  # DINOv2 decays the tokens
    assert not b["blocks_3"]["attn"]["qkv"]["bias"] and not b["patch_embed"]["proj"]["bias"]
    assert not b["blocks_3"]["norm1"]["scale"] and not b["norm"]["scale"] and not b["blocks_3"]["ls1"]["gamma"]
    assert wd["dino_head"]["last_layer"]["weight_g"] and wd["dino_head"]["last_layer"]["weight_v"]
    assert not wd["dino_head"]["mlp_0"]["bias"]
    last = optim.last_layer_mask(vitl_tree)
    assert last["dino_head"]["last_layer"]["weight_v"] and last["distill_heads"]["conch"]["last_layer"]["weight_g"]
    assert not last["dino_head"]["mlp_4"]["kernel"] and not last["backbone"]["norm"]["bias"]
    assert sum(jax.tree_util.tree_leaves(last)) == 8  # (g, v) of the DINO head and the three distillation heads


# ------------------------------------------------------------------------------------- optimiser behaviour


def _tiny_student():
    """A tiny tree with the student's top-level structure and the names the rules look at."""
    r = np.random.default_rng(0)
    a = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    return {
        "backbone": {"patch_embed": {"proj": {"kernel": a(2, 3), "bias": a(3)}}, "pos_embed": a(1, 2, 3),
                     "blocks_0": {"attn": {"qkv": {"kernel": a(3, 3)}}, "ls1": {"gamma": a(3)}},
                     "blocks_1": {"norm1": {"scale": a(3)}}, "norm": {"scale": a(3), "bias": a(3)}},
        "dino_head": {"mlp_0": {"kernel": a(3, 4), "bias": a(4)}, "last_layer": {"weight_g": a(5), "weight_v": a(4, 5)}},
        "distill_heads": {"uni": {"mlp": {"kernel": a(3, 4)}, "last_layer": {"weight_g": a(2), "weight_v": a(4, 2)}}},
    }


def _set_count(state, count):
    return (state[0], state[1], optim.ScheduleState(jnp.asarray(count, jnp.int32)))


def test_last_layers_frozen_for_first_1250_steps():
    params = _tiny_student()
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), params)
    tx = optim.make_optimizer(params, make_schedules(ScheduleConfig(), 1024))
    state = tx.init(params)
    last = optim.last_layer_mask(params)
    upd_frozen, _ = tx.update(grads, _set_count(state, 1_249), params)
    upd_free, _ = tx.update(grads, _set_count(state, 1_250), params)
    for u, is_last in zip(jax.tree_util.tree_leaves(upd_frozen), jax.tree_util.tree_leaves(last)):
        assert np.all(np.asarray(u) == 0) == is_last
    assert all(np.all(np.asarray(u) != 0) for u in jax.tree_util.tree_leaves(upd_free))


def test_clipping_only_backbone_and_dino_head_each_on_its_own():
    params = _tiny_student()
    big = lambda tree, scale: jax.tree_util.tree_map(lambda p: jnp.full_like(p, scale), tree)
    grads = {"backbone": big(params["backbone"], 100.0), "dino_head": big(params["dino_head"], 0.01),
             "distill_heads": big(params["distill_heads"], 1e4)}
    tx = optim.clip_modules_by_norm(3.0)
    clipped, state = tx.update(grads, tx.init(params))
    norm = optax.tree.norm
    assert float(norm(clipped["backbone"])) == pytest.approx(3.0, rel=1e-5)  # clipped
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(clipped["dino_head"])[0], np.float32(0.01))  # below 3: untouched
    for c, g in zip(jax.tree_util.tree_leaves(clipped["distill_heads"]), jax.tree_util.tree_leaves(grads["distill_heads"])):
        np.testing.assert_array_equal(c, g)  # huge, but never clipped
    assert float(state.grad_norms["backbone"]) == pytest.approx(float(norm(grads["backbone"])), rel=1e-6)
    # joint variant: one norm over backbone + DINO head, both scaled by the same factor
    joint, jstate = optim.clip_modules_by_norm(3.0, per_module=False).update(grads, None)
    assert list(jstate.grad_norms) == ["backbone+dino_head"]
    assert float(norm({"b": joint["backbone"], "d": joint["dino_head"]})) == pytest.approx(3.0, rel=1e-5)


def test_full_update_matches_hand_written_adamw():
    """One step at iteration t: torch AdamW with per-param lr = lr(t) * mult, wd = wd(t) * mask, after clipping."""
    params = _tiny_student()
    r = np.random.default_rng(1)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)
    sched = make_schedules(ScheduleConfig(), 1024)
    t = 60_000
    tx = optim.make_optimizer(params, sched)
    upd, new_state = jax.jit(tx.update)(grads, _set_count(tx.init(params), t), params)
    lr, wd = float(sched.lr(t)), float(sched.weight_decay(t))
    mult, mask = optim.lr_multipliers(params), optim.weight_decay_mask(params)
    for key in ("backbone", "dino_head", "distill_heads"):
        g = jax.tree_util.tree_map(np.asarray, grads[key])
        norm = math.sqrt(sum(float((x**2).sum()) for x in jax.tree_util.tree_leaves(g)))
        scale = min(1.0, 3.0 / (norm + 1e-6)) if key != "distill_heads" else 1.0
        for u, p, gg, m, d in zip(*(jax.tree_util.tree_leaves(x[key]) for x in (upd, params, grads, mult, mask))):
            gg = np.asarray(gg) * scale
            adam = gg / (np.abs(gg) + 1e-8)  # first Adam step: m_hat = g, v_hat = g^2
            ref = -lr * m * (adam + (wd * np.asarray(p) if d else 0.0))
            np.testing.assert_allclose(u, ref, rtol=2e-5, atol=1e-12)
    assert int(new_state[2].count) == t + 1
    assert set(optim.grad_norms(new_state)) == {"grad_norm/backbone", "grad_norm/dino_head"}


def test_ema_update():
    teacher = {"a": jnp.ones((2,)), "b": {"c": jnp.full((3,), 2.0)}}
    student = {"a": jnp.full((2,), 3.0), "b": {"c": jnp.zeros((3,))}}
    new = optim.ema_update(teacher, student, 0.9)
    np.testing.assert_allclose(new["a"], 0.9 * 1 + 0.1 * 3, **TOL)
    np.testing.assert_allclose(new["b"]["c"], 1.8, **TOL)
    same = optim.ema_update(teacher, student, jnp.asarray(1.0))  # momentum 1 (end of training): frozen teacher
    np.testing.assert_array_equal(same["a"], teacher["a"])
