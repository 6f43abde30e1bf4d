"""Exact gradient accumulation (`config.step.microbatches`): k = 1, 2, 4 sequential microbatches give the losses,
gradients, centres and updated state of one full-batch step within 1e-6 relative (fp32), with the recipe's
mechanisms on: batch-subset stochastic depth (0.4) drawn per group, KoLeo and the iBOT centre per batch group,
centring, all three (stand-in) expert teachers, masks from the recipe's generator; also per-sample stochastic depth,
and k = 2 on a data 2 x fsdp 4 mesh against one device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import normalised_batch
from helpers_train import tiny
from gpfm_jax.data.masking import batch_masks
from gpfm_jax.step import microbatch, sharding
from gpfm_jax.step.optim import make_optimizer
from gpfm_jax.step.schedules import make_schedules
from gpfm_jax.step.train_step import init_state, jit_train_step, make_grad_fn, make_train_step
from gpfm_jax.train import config as config_lib
from gpfm_jax.train.config_schema import ConfigError

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

B, GROUPS = 64, 16  # 16 groups of 4 samples (the reference's per-GPU batches, scaled down)
RTOL = 1e-6


def _config(rate: float = 0.4, shards: int = 2):
    teachers = {"uni": "standin", "phikon": "standin", "conch": "standin"}
    return tiny(**{"teachers": teachers, "loss.distill_cls_weights": {"uni": 1.0, "phikon": 0.5, "conch": 1.0},
                   "loss.distill_patch_weights": {"uni": 0.25, "phikon": 0.125}, "model.vit.drop_path_rate": rate,
                   "data.global_batch_size": B, "data.shards": shards, "step.batch_groups": GROUPS,
                   # 4 blocks: with 1 block a sample whose two residual branches are both dropped (p 0.16 at 0.4) has
                   # the constant CLS output, two such samples of a group are at KoLeo distance 0, and fp32 rounding
                   # of that 0 decides a gradient of 1/eps; not a state a real run is in, so not the one tested
                   "model.vit.depth": 4})


def _batch(cfg) -> dict[str, np.ndarray]:
    """Crops at random places of real H&E tiles (distinct images: KoLeo's nearest-neighbour distances are then not
    near zero, where fp32 rounding would dominate its gradient); masks from the recipe's generator, one draw per
    data shard."""
    rng = np.random.default_rng(0)
    mc = cfg.data.multicrop
    tiles = normalised_batch(256, count=5)

    def crops(size: int, n: int) -> np.ndarray:
        out = np.empty((B, n, size, size, 3), np.float32)
        for i in range(B):
            for v in range(n):
                y, x = rng.integers(0, 256 - size, 2)
                out[i, v] = tiles[rng.integers(0, len(tiles))][y : y + size, x : x + size]
        return out

    masking = config_lib.masking_config(cfg)
    per_shard = B // cfg.data.shards
    masks = np.concatenate([batch_masks(2 * per_shard, rng, masking).reshape(per_shard, 2, -1)
                            for _ in range(cfg.data.shards)])
    assert masks.sum() > 0
    return {"global_crops": crops(mc.global_size, 2), "local_crops": crops(mc.local_size, mc.num_local_crops),
            "masks": masks}


@pytest.fixture(scope="module")
def setup():
    cfg = _config()
    model, experts = config_lib.build_model(cfg)
    sched = make_schedules(cfg.schedule, B)
    tx = make_optimizer(jax.eval_shape(model.init_student, jax.random.key(0)), sched, cfg.optim)
    state = init_state(model, tx, jax.random.key(0))
    # past warm-up's first point and the frozen last layers (the optimizer's schedules count in its own state)
    at3 = lambda path, x: jnp.full_like(x, 3) if jax.tree_util.keystr(path).endswith(".count") else x  # noqa: E731
    state = state._replace(step=jnp.asarray(3, jnp.int32),
                           opt_state=jax.tree_util.tree_map_with_path(at3, state.opt_state))
    return dict(cfg=cfg, model=model, experts=experts, sched=sched, tx=tx, state=state, batch=_batch(cfg))


def _step_cfg(cfg, k: int, devices: int = 1):
    cfg = dataclasses.replace(cfg, step=dataclasses.replace(cfg.step, microbatches=k))
    return config_lib.step_config(cfg, num_devices=devices, process_count=1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _assert_trees_close(got, want, what: str) -> float:
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        r = _rel(a, b)
        assert r <= RTOL, f"{what} {jax.tree_util.keystr(path)}: relative difference {r:.2e}"
        worst = max(worst, r)
    return worst


@pytest.fixture(scope="module")
def full_batch(setup):
    """One full-batch gradient pass (k = 1) on the setup's batch: the reference of several tests, compiled once."""
    return _grads(setup, 1)[0]


def _grads(s, k: int, rate_cfg=None):
    cfg = rate_cfg or s["cfg"]
    step_cfg = _step_cfg(cfg, k)
    fn = jax.jit(make_grad_fn(s["model"], s["sched"], step_cfg))
    return fn(s["state"], s["batch"], s["experts"]), step_cfg


def test_microbatch_layout_keeps_every_group_whole():
    # 2 devices x 2 microbatches, 8 groups: device 0 holds groups 0-3, its first chunk 0-1
    np.testing.assert_array_equal(microbatch.group_ids(2, 2, 8), [[0, 1, 4, 5], [2, 3, 6, 7]])
    x = jnp.arange(16)
    chunks = microbatch.chunks(x, 2, 2)  # device rows [0..7], [8..15]; chunk m = rows m*4..m*4+3 of each
    np.testing.assert_array_equal(chunks, [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]])
    with pytest.raises(ValueError, match="must not straddle"):
        microbatch.check(16, 2, 2, batch_groups=2)


@pytest.mark.parametrize("k", [2, 4])
def test_k_microbatches_equal_the_full_batch(setup, full_batch, k):
    g1, m1, c1 = full_batch
    (gk, mk, ck), step_cfg = _grads(setup, k)
    assert step_cfg.max_masked < _step_cfg(setup["cfg"], 1).max_masked  # a microbatch's own buffer
    worst = {"metrics": 0.0}
    for name, value in m1.items():
        r = abs(float(mk[name]) - float(value)) / max(abs(float(value)), 1e-30)
        assert r <= RTOL, f"{name}: {float(mk[name])} vs {float(value)} ({r:.2e})"
        worst["metrics"] = max(worst["metrics"], r)
    assert set(m1) == set(mk) and float(m1["masked_overflow"]) == float(mk["masked_overflow"]) == 0
    worst["grads"] = _assert_trees_close(gk, g1, "grad")
    worst["centers"] = _assert_trees_close(ck, c1, "centre")
    print(f"k={k}: worst relative difference {worst}")


def test_one_accumulated_update_equals_the_full_batch_update(setup, full_batch):
    s = setup
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    batch = {n: jnp.asarray(v) for n, v in s["batch"].items()}
    steps = {k: jit_train_step(make_train_step(s["model"], s["sched"], s["tx"], _step_cfg(s["cfg"], k)), mesh,
                               s["state"], s["experts"]) for k in (1, 2)}
    # one full-batch step first: AdamW's moments are then those of a run, not zero (with zero moments the first
    # update is sign(g) elementwise, and a gradient entry near 0 turns fp32 rounding into a whole step)
    start, _ = steps[1](sharding.place(jax.tree_util.tree_map(jnp.copy, s["state"]), mesh), batch, s["experts"])
    start = jax.device_get(start)
    results = {k: steps[k](sharding.place(jax.tree_util.tree_map(jnp.copy, start), mesh), batch, s["experts"])
               for k in (1, 2)}
    (s1, _), (s2, _) = results[1], results[2]
    moved = _rel(s1.params["backbone"]["pos_embed"], start.params["backbone"]["pos_embed"])
    assert moved > 1e-4  # the update is not trivially zero
    # The key bias has no gradient (softmax is shift-invariant over keys): its fp32 "gradient" is rounding noise
    # (checked below), which AdamW's elementwise normalisation turns into +-lr steps in both runs alike but with
    # independent signs. Compared without it; everything else within 1e-6 of its leaf norm.
    without_key_bias = lambda tree: jax.tree_util.tree_map_with_path(_drop_key_bias, tree)  # noqa: E731
    _assert_trees_close(without_key_bias((s2.params, s2.teacher, s2.centers)),
                        without_key_bias((s1.params, s1.teacher, s1.centers)), "state")
    _assert_trees_close(without_key_bias(s2.opt_state), without_key_bias(s1.opt_state), "optimizer state")
    g = full_batch[0]
    for i in range(s["cfg"].model.vit.depth):
        bias = np.asarray(g["backbone"][f"blocks_{i}"]["attn"]["qkv"]["bias"]).reshape(3, -1)
        assert np.abs(bias[1]).max() < 1e-5 * np.abs(bias[[0, 2]]).max(), i  # noise, not a gradient


def _drop_key_bias(path, x):
    """qkv bias [3D] = (q, k, v): the key part replaced by zeros."""
    if jax.tree_util.keystr(path).endswith("['attn']['qkv']['bias']") and x.ndim == 1:
        d = x.shape[0] // 3
        return x.at[d : 2 * d].set(0)
    return x


def test_per_sample_stochastic_depth_is_drawn_as_in_the_full_batch(setup):
    cfg = _config(rate=0.1)  # <= 0.1: DINOv2's per-sample drop path
    s = dict(setup)
    s["model"], _ = config_lib.build_model(cfg)
    (g1, m1, _), _ = _grads(s, 1, cfg)
    (g2, m2, _), _ = _grads(s, 2, cfg)
    assert abs(float(m2["loss/total"]) - float(m1["loss/total"])) <= RTOL * abs(float(m1["loss/total"]))
    _assert_trees_close(g2, g1, "grad")


def test_two_microbatches_on_a_2x4_mesh_equal_one_device_full_batch(setup):
    """The microbatch slices of a really sharded batch (data 2 x fsdp 4, FSDP state) with per-device masked-token
    buffers: the same losses, gradients and centres as one device with the full batch and one buffer (the
    reductions run in another order: 1e-6 of each leaf's norm)."""
    import flax.linen as nn

    s = dict(setup)
    # masks drawn per device chunk (16 data shards = 8 devices x 2 microbatches, as the reference's per-GPU collate):
    # each device then gathers its own masked tokens (step/masked.py) into a buffer of its exact bound
    s["cfg"] = _config(shards=16)
    s["batch"] = _batch(s["cfg"])
    (g1, m1, c1), _ = _grads(s, 1)
    mesh = sharding.make_mesh(2, 4)
    step_cfg = _step_cfg(s["cfg"], 2, devices=8)
    assert step_cfg.shard_max_masked[0] == 8 and 0 < 8 * step_cfg.shard_max_masked[1] <= step_cfg.max_masked
    fn = make_grad_fn(s["model"], s["sched"], step_cfg)

    def in_mesh(state, batch, experts):
        with nn.logical_axis_rules(sharding.logical_rules()):
            return fn(state, batch, experts)

    state_sh, expert_sh = sharding.state_shardings(s["state"], mesh), sharding.state_shardings(s["experts"], mesh)
    with jax.set_mesh(mesh):
        jitted = jax.jit(in_mesh, in_shardings=(state_sh, sharding.batch_sharding(mesh), expert_sh))
        batch = {n: jax.device_put(v, sharding.batch_sharding(mesh)) for n, v in s["batch"].items()}
        g2, m2, c2 = jitted(sharding.place(s["state"], mesh), batch, sharding.place(s["experts"], mesh))
    assert batch["global_crops"].sharding.num_devices == 8
    for name, value in m1.items():
        np.testing.assert_allclose(float(m2[name]), float(value), rtol=RTOL, atol=1e-7, err_msg=name)
    _assert_trees_close(g2, g1, "grad")
    _assert_trees_close(c2, c1, "centre")


def test_config_refuses_what_cannot_be_split_exactly():
    base = _config()
    with pytest.raises(ConfigError, match=r"config\.loss\.centering='sinkhorn_knopp'.*config\.step\.microbatches=2"):
        config_lib.validate(dataclasses.replace(
            base, loss=dataclasses.replace(base.loss, centering="sinkhorn_knopp"),
            step=dataclasses.replace(base.step, microbatches=2)), num_devices=8, process_count=1)
    with pytest.raises(ConfigError, match=r"config\.step\.batch_groups=8 must be a multiple of devices x "
                                          r"config\.step\.microbatches \(8 x 2\)"):
        config_lib.validate(dataclasses.replace(base, step=dataclasses.replace(base.step, batch_groups=8,
                                                                                microbatches=2)),
                            num_devices=8, process_count=1)
    ok = dataclasses.replace(base, step=dataclasses.replace(base.step, batch_groups=0, microbatches=2))
    config_lib.validate(ok, num_devices=8, process_count=1)
    assert config_lib.step_config(ok, num_devices=8).batch_groups == 16  # default: devices x microbatches
