"""The whole training step and its dynamics against the official DINOv2 code (dinov2==0.0.1.dev2), with GPFM's
settings at a CPU size (tests/dinov2_oracle.py): the oracle's SSLMetaArch, optimiser, param groups, schedulers
and loop body vs gpfm_jax's jitted step, given the same weights (through the project's converters), the same
collated crops and the same masks.

Targets (issue 10): losses <= 1e-5 relative and params after one step <= 1e-5; per-iteration loss terms within
1e-3 relative over >= 50 iterations. GPFM's distillation terms (not in the oracle) are added on both sides as
docs/objective.md writes them.
"""

from __future__ import annotations

import numpy as np
import pytest

import dinov2_oracle as O
import fidelity_bridge as FB

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

B = 8


@pytest.fixture(scope="module")
def mods():
    return O.oracle()


def one_step(mods, centering: str, distill: bool):
    """One step at iteration 0 (no LR warmup, so the step moves the weights; the last layers are frozen), from a
    generic point in weight space (see OracleTrainer.randomize_backbone)."""
    cfg = O.gpfm_cfg(mods, batch_per_gpu=B, warmup_epochs=0, centering=centering)
    trainer = O.OracleTrainer(mods, cfg, seed=1)
    trainer.randomize_backbone(seed=1)
    experts = expert_params = heads = None
    targets_ref = {}
    if distill:
        experts, expert_params = FB.standin_experts()
        heads = FB.torch_distill_heads(mods, 64, experts)
        trainer.add_param_groups(heads)
        trainer.extra_loss = FB.torch_distill_loss(heads, targets_ref)
    twin = FB.jax_twin(trainer, experts=experts, distill_heads=heads)
    crops = FB.real_crop_batches(1, B, cfg, seed=3)[0]
    data = O.collate(mods, crops, cfg, seed=5)
    batch = FB.jax_batch(data, B)
    if distill:
        targets_ref["current"] = FB.expert_targets(experts, expert_params, batch, (8, 8))
    ref_terms = FB.unweighted(FB.oracle_terms(trainer.forward_backward(data, 0)))
    grads, metrics, _ = twin.grad_fn(twin.state, batch, expert_params or {})
    ref_grads = FB.oracle_grads_as_jax(trainer, heads)
    trainer.update(0)
    state, _ = twin.train_step(twin.state, batch, expert_params or {})
    return dict(trainer=trainer, heads=heads, ref_terms=ref_terms, metrics=metrics, grads=grads, ref_grads=ref_grads,
                state=state)


def check_one_step(r):
    ours = {k[len("loss/"):]: float(v) for k, v in r["metrics"].items() if k.startswith("loss/") and k != "loss/total"}
    assert set(ours) == set(r["ref_terms"])
    for k, ref in r["ref_terms"].items():
        assert abs(ours[k] - ref) <= 1e-5 * abs(ref), (k, ours[k], ref)
    # gradients: each leaf relative to its own norm, and each module's vector relative to the module's norm
    g = FB.flat(r["grads"])
    for k, ref in r["ref_grads"].items():
        assert np.linalg.norm(g[k] - ref) <= 1e-5 * max(np.linalg.norm(ref), 1e-30), k
    # params after the update, each leaf relative to its norm. (Elementwise, AdamW's first step is lr * g / (|g| + eps),
    # a sign function of the gradient: an element whose true gradient is at float32 noise level may move by lr either
    # way in either system, ~1e-4 of the leaf's largest value; docs/fidelity.md gives both figures.)
    worst, name = FB.worst_relative(FB.flat(r["state"].params), FB.oracle_student_as_jax(r["trainer"], r["heads"]),
                                    norm=True)
    assert worst <= 1e-5, (name, worst)
    worst, name = FB.worst_relative(FB.flat(r["state"].teacher), FB.oracle_teacher_as_jax(r["trainer"]), norm=True)
    assert worst <= 1e-5, (name, worst)
    for k, ref in r["trainer"].centers().items():
        assert FB.worst_relative({"c": np.asarray(r["state"].centers[k])}, {"c": ref})[0] <= 1e-5, k


def test_one_step_equals_the_oracle(mods):
    check_one_step(one_step(mods, "centering", distill=False))


def test_one_step_sinkhorn_knopp_equals_the_oracle(mods):
    O.init_single_process_group()  # iBOT's Sinkhorn-Knopp all-reduces its token count unconditionally
    check_one_step(one_step(mods, "sinkhorn_knopp", distill=False))


def test_one_step_with_gpfm_distillation_equals_the_oracle_plus_spec(mods):
    check_one_step(one_step(mods, "centering", distill=True))


def test_dynamics_60_iterations_match(mods):
    """60 iterations (LR warmup 10, last layers frozen 10, teacher temperature 0.04 -> 0.07 over 30, wd and EMA
    momentum cosines) on real H&E crops, with GPFM's distillation terms on both sides: every term within 1e-3 at every
    iteration (measured: ~1e-5, see docs/fidelity.md)."""
    cfg = O.gpfm_cfg(mods, batch_per_gpu=B, epochs=6)
    trainer = O.OracleTrainer(mods, cfg, seed=2)
    trainer.randomize_backbone(seed=2)
    experts, expert_params = FB.standin_experts()
    heads = FB.torch_distill_heads(mods, 64, experts)
    trainer.add_param_groups(heads)
    targets_ref = {}
    trainer.extra_loss = FB.torch_distill_loss(heads, targets_ref)
    twin = FB.jax_twin(trainer, experts=experts, distill_heads=heads)
    ref, ours = FB.run_dynamics(mods, trainer, twin, FB.real_crop_batches(60, B, cfg, seed=4), experts,
                                expert_params, targets_ref)
    for it, (r, o) in enumerate(zip(ref, ours)):
        for k in r:
            assert abs(o[k] - r[k]) <= 1e-3 * abs(r[k]), (it, k, o[k], r[k])
