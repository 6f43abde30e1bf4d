"""One GPFM training step: student (masked globals + locals), EMA teacher, expert teachers, DINO + iBOT + KoLeo +
distillation losses, AdamW update, EMA update, center updates — one jitted function, sharded by its arguments.

The batch: gpfm_jax/data/batch.py (keys, sample-major layout, `batch_spec`); uint8 crops are normalised at the
start of the step (gpfm_jax.data.normalize).
With `StepConfig.microbatches` > 1 the same step runs the batch as a scan over microbatches (exact gradient
accumulation, microbatch.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gpfm_jax import losses
from gpfm_jax.data.batch import GLOBAL_CROPS, LOCAL_CROPS, MASKS
from gpfm_jax.data.normalize import normalize_batch
from gpfm_jax.models.teachers import split_targets, teacher_targets
from gpfm_jax.step import microbatch, sharding, signals, xla_options
from gpfm_jax.step.masked import masked_selection
from gpfm_jax.step.model import GPFMModel, ema_subset, student_forward
from gpfm_jax.step.optim import ema_update, grad_norms
from gpfm_jax.step.schedules import Schedules, schedule_values


class TrainState(NamedTuple):
    """Everything that changes during training (the expert teachers are frozen and live outside)."""

    step: jax.Array  # int32, the 0-based iteration the next update is
    params: dict[str, Any]  # student: backbone, dino_head, distill_heads
    teacher: dict[str, Any]  # EMA: backbone, dino_head
    opt_state: Any
    centers: dict[str, jax.Array]  # "dino", "ibot": f32[K]
    rng: jax.Array  # root key; the step's key is fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    n_global: int = 2
    n_local: int = 8
    max_masked: int = 0  # buffer for the gathered masked tokens of one microbatch; 0 = all its 2B * N patches
    # The reference's per-GPU batches: this many contiguous groups of the batch, within which KoLeo looks for
    # neighbours and over which the iBOT centre averages per-group token means (config: 0 = one per device and
    # microbatch).
    batch_groups: int = 1
    drop_path_groups: int = 0  # batch-subset drop path drawn per group (reference: per GPU); 0 = batch_groups
    # Exact gradient accumulation: the batch runs as this many sequential microbatches (a scan: the memory of one),
    # one optimizer update per step. Each device's share is cut into `microbatches` contiguous chunks, so a group
    # (batch_groups, drop_path_groups: multiples of devices x microbatches) never straddles two microbatches.
    microbatches: int = 1
    # (devices, buffer): select the masked tokens per device into buffers of this many rows when the batch is split
    # over exactly that many devices (no gather across devices, the iBOT head not replicated); (0, 0): over the
    # whole (micro)batch into one buffer of max_masked rows
    shard_max_masked: tuple[int, int] = (0, 0)
    loss: losses.LossConfig = losses.LossConfig()
    # the student's global and local crops through each block's linear layers as one matrix (gpfm_jax/models/crops.py);
    # set from config.compute.concat_crops (default True there); False here keeps the two forwards as the reference
    concat_crops: bool = False


def init_state(model: GPFMModel, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = model.init_student(init_rng)
    k = model.heads.out_dim
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        teacher=jax.tree_util.tree_map(jnp.copy, ema_subset(params)),
        opt_state=tx.init(params),
        centers={"dino": losses.init_center(k), "ibot": losses.init_center(k)},
        rng=state_rng,
    )


def _views_first(x: jax.Array, batch: int, n_views: int) -> jax.Array:
    """[B * V, ...] (sample-major) -> [V, B, ...] as the losses take them."""
    return jnp.swapaxes(x.reshape((batch, n_views) + x.shape[1:]), 0, 1)


SUMMED_METRICS = ("masked_overflow",)  # counts: summed over microbatches (everything else is a batch mean)


def make_grad_fn(
    model: GPFMModel, schedules: Schedules, cfg: StepConfig
) -> Callable[[TrainState, Mapping[str, jax.Array], Mapping[str, Any]], tuple[Any, dict[str, jax.Array], dict]]:
    """grad_fn(state, batch, expert_params) -> (student grads, loss metrics, next centers): the objective of one step.

    The EMA teacher and the experts make the targets (no gradient); the student's masked global crops and its local
    crops make the predictions. Separate from the update so that tests can compare gradients with the reference.
    With `cfg.microbatches` = k > 1 the batch is processed in k microbatches (`microbatch.py`) and the gradients,
    metrics and next centres are their means: every term is a mean over samples, groups or crops of equal-sized
    microbatches, the centre update is linear in the batch mean, and each group draws its own stochastic depth,
    so the result is the full batch's up to float summation order (the collapse signals too: signals.py pools their
    per-microbatch moments after the scan).
    """
    objective = make_objective(model, schedules, cfg)
    k = cfg.microbatches

    def grad_fn(state: TrainState, batch: Mapping[str, jax.Array], expert_params: Mapping[str, Any]):
        if k == 1:
            grads, metrics, centers = objective(state, batch, expert_params, None)
            return grads, signals.finalize(metrics), centers
        chunks, group_ids = microbatch.split(batch, k, microbatch.batch_shards(), cfg.batch_groups,
                                             cfg.drop_path_groups or cfg.batch_groups)

        def body(total, xs):
            chunk, ids = xs
            grads, metrics, centers = objective(state, chunk, expert_params, ids)
            stacked = {name: metrics.pop(name) for name in signals.STACKED}  # per microbatch (signals.finalize)
            return jax.tree_util.tree_map(jnp.add, total, (grads, metrics, centers)), stacked

        shapes = list(jax.eval_shape(objective, state, microbatch.first(chunks), expert_params,
                                     microbatch.first(group_ids)))
        shapes[1] = {name: v for name, v in shapes[1].items() if name not in signals.STACKED}
        zero = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), tuple(shapes))
        (grads, metrics, centers), stacked = jax.lax.scan(body, zero, (chunks, group_ids))
        mean = lambda tree: jax.tree_util.tree_map(lambda a: a / k, tree)  # noqa: E731
        metrics = {name: (v if name in SUMMED_METRICS else v / k) for name, v in metrics.items()} | stacked
        return mean(grads), signals.finalize(metrics), mean(centers)

    return grad_fn


def make_objective(model: GPFMModel, schedules: Schedules, cfg: StepConfig) -> Callable:
    """objective(state, batch, expert_params, group_ids) -> (grads, loss metrics, next centres) of one (micro)batch.

    `group_ids` (None for the whole batch) name the batch groups and drop-path groups this microbatch holds, so its
    stochastic depth is the whole batch's. Centres: the teacher targets use the step's old centres; the "next
    centres" are this batch's EMA update (linear in its batch mean, so microbatch means average to the full batch's).
    """
    backbone, dino_head, distill_heads = model.backbone, model.dino_head, model.distill_heads
    loss_cfg = cfg.loss
    weights = losses.loss_weights(loss_cfg)
    k = cfg.microbatches
    groups, dp_groups = cfg.batch_groups // k, (cfg.drop_path_groups or cfg.batch_groups) // k
    dp_total = cfg.drop_path_groups or cfg.batch_groups

    def objective(state: TrainState, batch: Mapping[str, jax.Array], expert_params: Mapping[str, Any],
                  group_ids: Mapping[str, jax.Array] | None):
        batch = normalize_batch(batch, model.vit.dtype, *(e.spec.vit.dtype for e in model.experts.values()))
        b = batch[GLOBAL_CROPS].shape[0]
        n_g, n_l = cfg.n_global, cfg.n_local
        global_crops = batch[GLOBAL_CROPS].reshape((b * n_g,) + batch[GLOBAL_CROPS].shape[2:])
        local_crops = batch[LOCAL_CROPS].reshape((b * n_l,) + batch[LOCAL_CROPS].shape[2:])
        masks = batch[MASKS].reshape(b * n_g, -1)
        max_masked = cfg.max_masked or masks.size
        step = state.step
        key_global, key_local = jax.random.split(jax.random.fold_in(state.rng, step))
        tau = schedules.teacher_temp(step)
        drop_path = dict(drop_path_groups=dp_groups)
        if group_ids is not None:
            drop_path |= dict(drop_path_group_ids=group_ids["drop_path"], drop_path_total_groups=dp_total)

        select = masked_selection(masks, max_masked, groups, cfg.shard_max_masked)

        # EMA teacher on the unmasked global crops: CLS targets and the patch targets at the masked positions.
        t_out = backbone.apply({"params": state.teacher["backbone"]}, global_crops)
        t_cls_logits = dino_head.apply({"params": state.teacher["dino_head"]}, t_out["cls"])
        t_tokens, _, valid = select.tokens(t_out["patch"])
        t_patch_logits = dino_head.apply({"params": state.teacher["dino_head"]}, t_tokens)
        dino_probs, dino_center = losses.teacher_targets(
            t_cls_logits, state.centers["dino"], tau, loss_cfg.centering, loss_cfg.center_momentum,
            loss_cfg.sinkhorn_iterations)
        ibot_probs, ibot_center = losses.teacher_targets(
            t_patch_logits, state.centers["ibot"], tau, loss_cfg.centering, loss_cfg.center_momentum,
            loss_cfg.sinkhorn_iterations, valid=valid, center_weights=select.center_weights)
        dino_probs, ibot_probs = jax.lax.stop_gradient((dino_probs, ibot_probs))

        grid = (global_crops.shape[1] // model.vit.patch_size, global_crops.shape[2] // model.vit.patch_size)
        targets = teacher_targets(model.experts, expert_params, global_crops, student_grid=grid)
        cls_targets, patch_targets = split_targets(targets)

        def loss_fn(params):
            s_global, s_local = student_forward(backbone, params["backbone"], global_crops, masks, local_crops,
                                                (key_global, key_local), drop_path, cfg.concat_crops)
            head = lambda x: dino_head.apply({"params": params["dino_head"]}, x)  # noqa: E731
            dino = losses.dino_loss(
                _views_first(head(s_global["cls"]), b, n_g), _views_first(dino_probs, b, n_g),
                _views_first(head(s_local["cls"]), b, n_l), student_temp=loss_cfg.student_temp)
            s_tokens, token_weights, _ = select.tokens(s_global["patch"])
            ibot = losses.ibot_loss(head(s_tokens), ibot_probs, token_weights, b * n_g, loss_cfg.student_temp)
            terms = {"dino": dino, "ibot": ibot}
            if "koleo" in weights:  # a weight of 0 switches a term off (loss_weights keeps only positive ones)
                terms["koleo"] = losses.koleo_global_views(_views_first(s_global["cls"], b, n_g), groups,
                                                           loss_cfg.koleo_eps, loss_cfg.koleo_pairwise_eps)
            terms = {name: value for name, value in terms.items() if name in weights}
            distill = lambda x: distill_heads.apply({"params": params["distill_heads"]}, x)  # noqa: E731
            terms |= losses.distill_terms(distill(s_global["cls"]), cls_targets, distill(s_global["patch"]),
                                          patch_targets, loss_cfg)
            return losses.weighted_total(terms, weights)

        (_, loss_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        loss_metrics = {**loss_metrics, "masked_fraction": jnp.sum(masks.astype(jnp.int32)) / masks.size,
                        "masked_overflow": select.overflow,
                        **signals.batch_moments(dino_probs, t_out["cls"])}  # signals.finalize: collapse/*
        return grads, loss_metrics, {"dino": dino_center, "ibot": ibot_center}

    return objective


def make_train_step(
    model: GPFMModel, schedules: Schedules, tx: optax.GradientTransformation, cfg: StepConfig
) -> Callable[[TrainState, Mapping[str, jax.Array], Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """train_step(state, batch, expert_params) -> (new state, metrics); not jitted (see `jit_train_step`).

    Gradients of the objective -> optimiser (per-module clipping, AdamW with the schedules) -> EMA of the backbone
    and DINO head -> the centres computed from this step's teacher outputs (used from the next step on).
    """
    grad_fn = make_grad_fn(model, schedules, cfg)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array], expert_params: Mapping[str, Any]):
        grads, loss_metrics, centers = grad_fn(state, batch, expert_params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        teacher = ema_update(state.teacher, ema_subset(params), schedules.momentum(state.step))
        metrics = {**loss_metrics, **schedule_values(schedules, state.step), **grad_norms(opt_state)}
        return TrainState(state.step + 1, params, teacher, opt_state, centers, state.rng), metrics

    return train_step


@dataclasses.dataclass(frozen=True)
class ShardedStep:
    """The jitted step bound to a mesh: FSDP state/expert shardings, batch split over (data, fsdp), state donated."""

    jitted: Any
    mesh: Mesh

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array], expert_params: Mapping[str, Any]):
        with jax.set_mesh(self.mesh):
            return self.jitted(state, batch, expert_params)

    def lower(self, *args: Any):
        """For compile-time, memory and cost analysis (`.compile().memory_analysis()`)."""
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def jit_train_step(train_step: Callable, mesh: Mesh, state: Any, expert_params: Any) -> ShardedStep:
    """`state` / `expert_params` may be arrays or ShapeDtypeStructs: only their structure and shapes are used."""
    rules = sharding.logical_rules()

    def step_in_mesh(state, batch, expert_params):
        with nn.logical_axis_rules(rules):
            return train_step(state, batch, expert_params)

    state_sh = sharding.state_shardings(state, mesh)
    jitted = jax.jit(
        step_in_mesh,
        in_shardings=(state_sh, sharding.batch_sharding(mesh), sharding.state_shardings(expert_params, mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=xla_options.compiler_options(mesh.devices.flat[0].platform) or None,
    )
    return ShardedStep(jitted, mesh)
