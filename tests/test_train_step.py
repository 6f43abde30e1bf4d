"""The jitted GPFM step: same result on 1 device and on a (data 2 x fsdp 4) mesh, really sharded state, EMA and
center updates as specified, frozen last layers, and a falling loss on real tiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import normalised_batch
from gpfm_jax.models.vit import ViTConfig
from gpfm_jax.encoders.teachers import load_teachers
from gpfm_jax.step import sharding
from gpfm_jax.step.model import GPFMModel, HeadConfig
from gpfm_jax.step.optim import OptimConfig, make_optimizer
from gpfm_jax.step.schedules import ScheduleConfig, make_schedules
from gpfm_jax.step.train_step import StepConfig, init_state, jit_train_step, make_grad_fn, make_train_step

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

B = 8


def _real_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Sample-major multi-crop batch cut from real H&E tiles (simple crops; the augmentation has its own tests)."""
    rng = np.random.default_rng(seed)
    tiles = normalised_batch(256, count=5)
    idx = rng.integers(0, len(tiles), B)
    def crop(img, size, out):
        y, x = rng.integers(0, img.shape[0] - size + 1, 2)
        c = img[y : y + size, x : x + size]
        return jax.image.resize(c, (out, out, 3), "bilinear")
    global_crops = np.stack([[np.asarray(crop(tiles[i], 240, 224)) for _ in range(2)] for i in idx])
    local_crops = np.stack([[np.asarray(crop(tiles[i], 120, 98)) for _ in range(8)] for i in idx])
    masks = np.zeros((B, 2, 256), bool)
    for i in range(B):  # half of the 2B global crops masked, like the recipe
        masks[i, 0, rng.choice(256, 40 + 10 * i, replace=False)] = True
    return {"global_crops": global_crops.astype(np.float32), "local_crops": local_crops.astype(np.float32),
            "masks": masks}


@pytest.fixture(scope="module")
def setup():
    experts, expert_params = load_teachers({"uni": None, "phikon": None, "conch": None})
    vit = ViTConfig(embed_dim=64, depth=2, num_heads=4, layerscale_init=1.0, drop_path_rate=0.2)
    model = GPFMModel(vit, HeadConfig(out_dim=256, hidden_dim=64, bottleneck_dim=32, distill_bottleneck_dim=32),
                      experts)
    sched = make_schedules(ScheduleConfig(base_lr=5e-2, total_steps=100, warmup_steps=2, teacher_temp_warmup_steps=10,
                                          freeze_last_layer_steps=2), B)
    tx = make_optimizer(jax.eval_shape(model.init_student, jax.random.key(0)), sched, OptimConfig())
    state = init_state(model, tx, jax.random.key(0))
    step = make_train_step(model, sched, tx, StepConfig(batch_groups=2, drop_path_groups=1))
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    return dict(model=model, sched=sched, tx=tx, state=state, step=step, experts=expert_params,
                single=jit_train_step(step, mesh, state, expert_params), mesh=mesh, batch=_real_batch())


def _run(fn, mesh, state, experts, batch):
    state = sharding.place(jax.tree_util.tree_map(jnp.copy, state), mesh)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    return fn(state, batch, sharding.place(experts, mesh))


def test_step_on_2x4_mesh_matches_one_device_and_shards_the_state(setup):
    s = setup
    one_state, one_metrics = _run(s["single"], s["mesh"], s["state"], s["experts"], s["batch"])
    mesh = sharding.make_mesh(2, 4)
    many = jit_train_step(s["step"], mesh, s["state"], s["experts"])
    new_state, metrics = _run(many, mesh, s["state"], s["experts"], s["batch"])
    for key, value in one_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-5, atol=1e-7, err_msg=key)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # noqa
    jax.tree_util.tree_map(close, new_state._replace(rng=None), one_state._replace(rng=None))
    np.testing.assert_array_equal(jax.random.key_data(new_state.rng), jax.random.key_data(one_state.rng))
    fc1 = new_state.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # (64, 256): split on its 256 dim
    assert fc1.sharding.spec == P(None, "fsdp") and fc1.addressable_shards[0].data.shape == (64, 64)
    proto = new_state.teacher["dino_head"]["last_layer"]["weight_v"]
    assert "fsdp" in tuple(proto.sharding.spec)
    nu = new_state.opt_state[1].nu["backbone"]["blocks_1"]["attn"]["qkv"]["kernel"]
    assert nu.sharding.spec == P(None, "fsdp")


def test_concatenated_crops_step_on_2x4_mesh_matches_two_forwards_on_one_device(setup):
    """compute.concat_crops: the student's global and local crops through each block as one token matrix, the batch
    sharded over 8 devices, gives the step of the two separate forwards (same drop path draws)."""
    s = setup
    one_state, one_metrics = _run(s["single"], s["mesh"], s["state"], s["experts"], s["batch"])
    step = make_train_step(s["model"], s["sched"], s["tx"], StepConfig(batch_groups=2, drop_path_groups=1,
                                                                       concat_crops=True))
    mesh = sharding.make_mesh(2, 4)
    new_state, metrics = _run(jit_train_step(step, mesh, s["state"], s["experts"]), mesh, s["state"], s["experts"],
                              s["batch"])
    for key, value in one_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-5, atol=1e-7, err_msg=key)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # noqa
    jax.tree_util.tree_map(close, new_state._replace(rng=None), one_state._replace(rng=None))


def test_ema_centers_and_frozen_last_layer(setup):
    s = setup
    model, sched, state = s["model"], s["sched"], s["state"]
    first, metrics = _run(s["single"], s["mesh"], state, s["experts"], s["batch"])
    assert int(first.step) == 1
    # DINO center: 0.9 c + 0.1 * mean of the EMA teacher's CLS logits on the unmasked global crops.
    crops = s["batch"]["global_crops"].reshape(2 * B, 224, 224, 3)
    cls = model.backbone.apply({"params": state.teacher["backbone"]}, crops)["cls"]
    logits = model.dino_head.apply({"params": state.teacher["dino_head"]}, cls)
    np.testing.assert_allclose(first.centers["dino"], 0.9 * state.centers["dino"] + 0.1 * logits.mean(0), atol=1e-6)
    assert float(metrics["masked_fraction"]) == pytest.approx(s["batch"]["masks"].mean())
    # Step 1 (LR > 0 after the 2-step warmup's first point): EMA teacher = m * teacher + (1 - m) * new student.
    second, metrics = _run(s["single"], s["mesh"], first, s["experts"], s["batch"])
    m = float(sched.momentum(1))
    assert 0.992 <= m < 1.0 and float(metrics["schedule/lr"]) > 0
    expect = jax.tree_util.tree_map(lambda t, p: m * t + (1 - m) * p, first.teacher,
                                    {"backbone": second.params["backbone"], "dino_head": second.params["dino_head"]})
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), second.teacher, expect)
    # Last layers frozen for the first 2 iterations: weight_v unchanged (LR 0) while the MLPs moved.
    for head in (("dino_head",), ("distill_heads", "uni")):
        before, after = state.params, second.params
        for key in head:
            before, after = before[key], after[key]
        np.testing.assert_array_equal(after["last_layer"]["weight_v"], before["last_layer"]["weight_v"])
        mlp = "mlp_0" if head == ("dino_head",) else "mlp"
        assert np.max(np.abs(after[mlp]["kernel"] - before[mlp]["kernel"])) > 1e-6, head


def test_a_few_steps_lower_the_total_loss_on_real_tiles(setup):
    s = setup
    state = sharding.place(jax.tree_util.tree_map(jnp.copy, s["state"]), s["mesh"])
    experts = sharding.place(s["experts"], s["mesh"])
    batch = {k: jax.device_put(v, sharding.batch_sharding(s["mesh"])) for k, v in s["batch"].items()}
    history = []
    for _ in range(6):
        state, metrics = s["single"](state, batch, experts)
        history.append({k: float(v) for k, v in metrics.items() if k.startswith("loss/")})
    totals = [h["loss/total"] for h in history]
    assert all(np.isfinite(totals))
    assert totals[-1] < totals[0] - 1.0, totals  # ~9.8 -> ~6.0 with this seed
    for term in ("distill/uni/cls", "distill/phikon/cls", "distill/conch/cls", "distill/uni/patch"):
        assert history[-1][f"loss/{term}"] < 0.8 * history[0][f"loss/{term}"], term


def test_a_loss_weight_of_zero_switches_the_term_off(setup):
    """loss.koleo_weight = 0: no KoLeo term (not computed, not in the metrics) and the total is the default step's
    total less its 0.1 x KoLeo: the other terms are the same numbers (same state, batch and keys)."""
    import dataclasses

    from gpfm_jax.losses import LossConfig

    s = setup
    base_cfg = StepConfig(batch_groups=2, drop_path_groups=1)
    off_cfg = dataclasses.replace(base_cfg, loss=dataclasses.replace(base_cfg.loss, koleo_weight=0.0))
    # the step's loss metrics are its gradient function's (make_train_step adds schedule values and grad norms only):
    # the objective alone is compiled for the switched-off term
    off = jax.jit(make_grad_fn(s["model"], s["sched"], off_cfg))
    _, m_on = _run(s["single"], s["mesh"], s["state"], s["experts"], s["batch"])
    _, m_off, _ = off(s["state"], s["batch"], s["experts"])
    assert "loss/koleo" in m_on and "loss/koleo" not in m_off
    assert LossConfig().koleo_weight == 0.1
    np.testing.assert_allclose(float(m_off["loss/total"]),
                               float(m_on["loss/total"]) - 0.1 * float(m_on["loss/koleo"]), rtol=1e-6)
    for key in ("loss/dino", "loss/ibot"):
        np.testing.assert_allclose(float(m_off[key]), float(m_on[key]), rtol=1e-6)
