"""Both sides of tools/bench_vs_official.py (issue 27), built from the fidelity oracle (tests/dinov2_oracle.py,
tests/fidelity_bridge.py, imported): the official DINOv2/GPFM trainer on a device in a given precision, and
gpfm_jax's production step (scanned blocks, concatenated crops, `jit_train_step`) holding the same weights."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:  # tools may import the test oracles; the package never does
    sys.path.insert(0, str(REPO / "tests"))

import dinov2_oracle as O  # noqa: E402
import fidelity_bridge as FB  # noqa: E402


class OfficialTrainer(O.OracleTrainer):
    """The oracle's trainer on `device` under `autocast` (None: fp32), with train.py's GradScaler steps for fp16.
    Batches are moved to the device beforehand (the oracle turns `.cuda()` into a no-op)."""

    autocast: Any = None
    scaler: Any = None

    def _forward_backward(self, data, temp):
        with self.autocast() if self.autocast else contextlib.nullcontext():
            return super()._forward_backward(data, temp)

    def update(self, iteration: int) -> None:
        import torch

        if self.scaler is None:
            return super().update(iteration)
        self.scaler.unscale_(self.optimizer)  # train.py's fp16 branch
        for v in self.model.student.values():
            torch.nn.utils.clip_grad_norm_(v.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_teacher(self.momentum[iteration])


def build_experts(size: str, dtype: str, seed: int = 0, params=None):
    """The same random expert teachers for both sides: tiny stand-ins, or UNI / Phikon / CONCH at their real
    architectures (compute and params in `dtype`, as gpfm-train builds them; `params`: these values, cast)."""
    if size == "tiny":
        return FB.standin_experts(seed=seed)
    from gpfm_jax.models import attention
    from gpfm_jax.models.teachers import TEACHERS, build_teacher, cast_params

    impl = attention.resolve_impl(attention.AUTO, jax.default_backend(), dtype)
    experts, params, given = {}, {}, params
    for i, name in enumerate(FB.DISTILL_CLS):
        experts[name] = build_teacher(TEACHERS[name], dtype=dtype, param_dtype=dtype, scan_layers=False,
                                      attention_impl=impl)
        params[name] = (jax.device_put(experts[name].init_params(seed + i)) if given is None else
                        cast_params(given[name], dtype))
    return experts, params


def official(args, mods, s: dict, device: str, experts):
    """OfficialTrainer at `s` (GPFM's settings, the recipe's stochastic depth) with GPFM's distillation heads, and
    gpfm_jax's twin of it (the same weights). fp32 matmuls (no TF32) until the check is done."""
    import torch

    cfg = O.gpfm_cfg(mods, batch_per_gpu=int(args.batches.split(",")[0]), warmup_epochs=0, img=s["img"],
                     local=s["local"], n_local=s["n_local"], out_dim=s["out_dim"], hidden=s["hidden"],
                     bottleneck=s["bottleneck"], drop_path=s["drop_path"], **s["arch"])
    trainer = OfficialTrainer(mods, cfg, seed=1)
    trainer.randomize_backbone(seed=1)
    heads = FB.torch_distill_heads(mods, s["arch"]["embed_dim"], experts, bottleneck=s["distill_bottleneck"])
    trainer.add_param_groups(heads)
    targets_ref: dict = {}
    trainer.extra_loss = FB.torch_distill_loss(heads, targets_ref)
    twin = FB.jax_twin(trainer, experts=experts, distill_heads=heads)  # converted before the move to the device
    host = jax.device_get((twin.state.params, twin.state.teacher))  # kept on the host: a device state per program
    twin.state = twin.state._replace(params=host[0], teacher=host[1], opt_state=None)
    trainer.model.to(device), heads.to(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 for the check
    return trainer, heads, targets_ref, twin


def jax_state(twin, trainer, s: dict):
    """A fresh TrainState from the twin's weights in the production layout (scanned blocks)."""
    from gpfm_jax import losses
    from gpfm_jax.convert.layout import stack_blocks
    from gpfm_jax.step.optim import make_optimizer
    from gpfm_jax.step.train_step import TrainState

    stack = lambda tree: {**tree, "backbone": stack_blocks(tree["backbone"])}  # noqa: E731
    params, teacher = stack(twin.state.params), stack(twin.state.teacher)
    tx = make_optimizer(params, twin.schedules, FB.optim_config(trainer.cfg))
    k = s["out_dim"]
    return tx, TrainState(jnp.zeros((), jnp.int32), params, teacher, tx.init(params),
                          {"dino": losses.init_center(k), "ibot": losses.init_center(k)}, jax.random.key(0))


def jax_step(twin, tx, state, experts, expert_params, *, dtype: str, drop_path: float, remat: str,
             max_masked: int):
    """gpfm_jax's production step (scanned blocks, concatenated crops, `jit_train_step` on a one-device mesh: the
    shardings, donation and XLA options gpfm-train compiles with) with the twin's settings."""
    from gpfm_jax.step.sharding import make_mesh
    from gpfm_jax.step.train_step import jit_train_step, make_train_step

    vit = dataclasses.replace(twin.model.vit, dtype=dtype, drop_path_rate=drop_path, attention_impl="auto",
                              scan_layers=True, remat_policy=remat)
    model = dataclasses.replace(twin.model, vit=vit, experts=experts)
    step_cfg = dataclasses.replace(twin.step_cfg, concat_crops=True, max_masked=max_masked)
    mesh = make_mesh(1, 1, devices=jax.local_devices()[:1])
    return jit_train_step(make_train_step(model, twin.schedules, tx, step_cfg), mesh, state, expert_params)


def batch_for(mods, trainer, b: int, device: str, seed: int = 3):
    """(official collated batch on the device, gpfm_jax's batch): real H&E crops, the oracle's collate and masks."""
    import torch

    crops = FB.real_crop_batches(1, b, trainer.cfg, seed=seed)[0]
    data = O.collate(mods, crops, trainer.cfg, seed=5)
    jbatch = FB.jax_batch(data, b)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}, jbatch


def targets_fn(experts, grid):
    """Jitted expert targets in the oracle's view-major crop order (FB.expert_targets, on the device)."""
    from gpfm_jax.models.teachers import teacher_targets

    @jax.jit
    def fn(params, g):
        b, v = g.shape[:2]
        out = teacher_targets(experts, params, g.reshape((b * v,) + g.shape[2:]), student_grid=grid)
        vm = lambda x: jnp.swapaxes(x.reshape((b, v) + x.shape[1:]), 0, 1).reshape(x.shape)  # noqa: E731
        return jax.tree_util.tree_map(vm, out)

    return fn
