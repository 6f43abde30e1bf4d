"""Builds the gpfm_jax twin of an `OracleTrainer` (tests/dinov2_oracle.py): the same weights (through the project's
converters), the same settings, the same batch — and compares the two. Test-only."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpfm_jax import losses
from gpfm_jax.convert import head_keys, vit_keys
from gpfm_jax.step.model import GPFMModel, HeadConfig
from gpfm_jax.step.optim import OptimConfig, make_optimizer
from gpfm_jax.step.schedules import ScheduleConfig, make_schedules
from gpfm_jax.step.train_step import StepConfig, TrainState, make_grad_fn, make_train_step

NO_DISTILL = dict(distill_cls_weights={}, distill_patch_weights={})


def torch_state(module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_grads(module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: (p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
            for k, p in module.named_parameters()}


def backbone_to_jax(state: dict[str, np.ndarray], num_heads: int, layerscale: float | None):
    """A DINOv2 backbone state dict through the project's converter: (ViTConfig, params)."""
    canonical, ignored = vit_keys.canonical_keys(state, "oracle backbone")
    assert not ignored, ignored
    cfg = vit_keys.infer_vit_config(canonical, "oracle backbone", num_heads=num_heads, layerscale_init=layerscale)
    return cfg, jax.tree_util.tree_map(jnp.asarray, vit_keys.vit_params_from_torch(canonical, cfg, "oracle backbone"))


def module_pair_to_jax(backbone_state, head_state, num_heads, layerscale):
    cfg, backbone = backbone_to_jax(backbone_state, num_heads, layerscale)
    head = jax.tree_util.tree_map(jnp.asarray, head_keys.dino_head_from_torch(head_state, "oracle head", prefix=""))
    return cfg, {"backbone": backbone, "dino_head": head}


def schedule_config(cfg) -> ScheduleConfig:
    """The oracle's schedule settings as gpfm_jax's ScheduleConfig (epochs x OFFICIAL_EPOCH_LENGTH -> iterations)."""
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    return ScheduleConfig(
        base_lr=cfg.optim.base_lr, reference_batch_size=1024, min_lr=cfg.optim.min_lr,
        total_steps=cfg.optim.epochs * epoch, warmup_steps=cfg.optim.warmup_epochs * epoch,
        weight_decay=cfg.optim.weight_decay, weight_decay_end=cfg.optim.weight_decay_end,
        teacher_temp_start=cfg.teacher.warmup_teacher_temp, teacher_temp=cfg.teacher.teacher_temp,
        teacher_temp_warmup_steps=cfg.teacher.warmup_teacher_temp_epochs * epoch,
        momentum_teacher=cfg.teacher.momentum_teacher, final_momentum_teacher=cfg.teacher.final_momentum_teacher,
        freeze_last_layer_steps=cfg.optim.freeze_last_layer_epochs * epoch)


def optim_config(cfg) -> OptimConfig:
    """The oracle's AdamW settings as gpfm_jax's OptimConfig."""
    return OptimConfig(b1=cfg.optim.adamw_beta1, b2=cfg.optim.adamw_beta2, layer_decay=cfg.optim.layerwise_decay,
                       patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult, clip_grad_norm=cfg.optim.clip_grad)


@dataclasses.dataclass
class JaxTwin:
    model: GPFMModel
    step_cfg: StepConfig
    schedules: Any
    tx: Any
    state: TrainState
    train_step: Any
    grad_fn: Any


def jax_twin(trainer, *, experts=None, expert_params=None, distill_heads=None, loss_overrides=None,
             step_overrides=None) -> JaxTwin:
    """gpfm_jax's system with the oracle's weights and settings; `distill_heads` = torch heads (GPFM on top)."""
    cfg = trainer.cfg
    student, teacher = trainer.model.student, trainer.model.teacher
    heads = cfg.dino
    num_heads = student.backbone.num_heads
    vit, s_params = module_pair_to_jax(torch_state(student.backbone), torch_state(student.dino_head), num_heads,
                                       cfg.student.layerscale)
    _, t_params = module_pair_to_jax(torch_state(teacher.backbone), torch_state(teacher.dino_head), num_heads,
                                     cfg.student.layerscale)
    vit = dataclasses.replace(vit, drop_path_rate=cfg.student.drop_path_rate, attention_impl="xla")
    s_params["distill_heads"] = {}
    if distill_heads is not None:
        s_params["distill_heads"] = {
            name: jax.tree_util.tree_map(jnp.asarray, head_keys.dino_head_from_torch(torch_state(h), name, prefix=""))
            for name, h in distill_heads.items()}
    distill_dim = 256 if distill_heads is None else next(iter(distill_heads.values())).mlp.weight.shape[0]
    model = GPFMModel(vit, HeadConfig(out_dim=heads.head_n_prototypes, hidden_dim=heads.head_hidden_dim,
                                      bottleneck_dim=heads.head_bottleneck_dim, nlayers=heads.head_nlayers,
                                      distill_bottleneck_dim=distill_dim), experts or {})
    loss_cfg = losses.LossConfig(
        dino_weight=cfg.dino.loss_weight, ibot_weight=cfg.ibot.loss_weight, koleo_weight=cfg.dino.koleo_loss_weight,
        centering=cfg.train.centering, **(NO_DISTILL if distill_heads is None else {}), **(loss_overrides or {}))
    step_cfg = StepConfig(n_global=2, n_local=cfg.crops.local_crops_number, loss=loss_cfg, **(step_overrides or {}))
    global_batch = cfg.train.batch_size_per_gpu
    schedules = make_schedules(schedule_config(cfg), global_batch)
    tx = make_optimizer(s_params, schedules, optim_config(cfg))
    k = heads.head_n_prototypes
    state = TrainState(jnp.zeros((), jnp.int32), s_params, t_params, tx.init(s_params),
                       {"dino": losses.init_center(k), "ibot": losses.init_center(k)}, jax.random.key(0))
    return JaxTwin(model, step_cfg, schedules, tx, state, jax.jit(make_train_step(model, schedules, tx, step_cfg)),
                   jax.jit(make_grad_fn(model, schedules, step_cfg)))


def jax_batch(data: dict, batch: int) -> dict[str, jax.Array]:
    """The oracle's collated batch (view-major NCHW) as gpfm_jax's sample-major NHWC batch."""
    from dinov2_oracle import view_major_to_sample_major

    g = view_major_to_sample_major(data["collated_global_crops"].numpy(), batch).transpose(0, 1, 3, 4, 2)
    loc = view_major_to_sample_major(data["collated_local_crops"].numpy(), batch).transpose(0, 1, 3, 4, 2)
    m = view_major_to_sample_major(data["collated_masks"].numpy(), batch)
    return {"global_crops": jnp.asarray(g), "local_crops": jnp.asarray(loc), "masks": jnp.asarray(m)}


def oracle_terms(loss_dict: dict[str, float]) -> dict[str, float]:
    """The oracle's displayed losses as gpfm_jax's unweighted terms (its KoLeo display is weight * sum / 2 and its
    iBOT display is the loss / 2 of a loss counted twice; DINO = global + local parts)."""
    out = {"dino": loss_dict["dino_global_crops_loss"] + loss_dict["dino_local_crops_loss"],
           "ibot": 2 * loss_dict["ibot_loss"], "koleo": loss_dict["koleo_loss"] * 2 / 0.1}
    out.update({k: v for k, v in loss_dict.items() if k.startswith("distill/")})
    return out


def flat(tree, prefix="") -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[prefix + "/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(leaf)
    return out


def worst_relative(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], norm: bool = False) -> tuple[float, str]:
    """max over leaves of max|a - b| / max|b|, or with `norm` ||a - b|| / ||b|| (all-zero leaves: absolute)."""
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))[:5]
    worst, name = 0.0, ""
    for k in ref:
        a, b = np.asarray(ours[k], np.float64), np.asarray(ref[k], np.float64)
        assert a.shape == b.shape, (k, a.shape, b.shape)
        size = (lambda x: np.linalg.norm(x.ravel())) if norm else (lambda x: np.max(np.abs(x)))
        scale = size(b)
        err = size(a - b) / (scale if scale > 0 else 1.0)
        if err > worst:
            worst, name = float(err), k
    return worst, name


def oracle_student_as_jax(trainer, distill_heads=None) -> dict[str, np.ndarray]:
    cfg = trainer.cfg
    _, p = module_pair_to_jax(torch_state(trainer.model.student.backbone), torch_state(trainer.model.student.dino_head),
                              trainer.model.student.backbone.num_heads, cfg.student.layerscale)
    out = flat(p)
    for name, h in (distill_heads or {}).items():
        out |= flat(head_keys.dino_head_from_torch(torch_state(h), name, prefix=""), f"distill_heads/{name}/")
    return out


def oracle_grads_as_jax(trainer, distill_heads=None) -> dict[str, np.ndarray]:
    cfg = trainer.cfg
    _, g = module_pair_to_jax(torch_grads(trainer.model.student.backbone), torch_grads(trainer.model.student.dino_head),
                              trainer.model.student.backbone.num_heads, cfg.student.layerscale)
    out = flat(g)
    for name, h in (distill_heads or {}).items():
        out |= flat(head_keys.dino_head_from_torch(torch_grads(h), name, prefix=""), f"distill_heads/{name}/")
    return out


def oracle_teacher_as_jax(trainer) -> dict[str, np.ndarray]:
    _, p = module_pair_to_jax(torch_state(trainer.model.teacher.backbone), torch_state(trainer.model.teacher.dino_head),
                              trainer.model.teacher.backbone.num_heads, trainer.cfg.student.layerscale)
    return flat(p)


def real_crop_batches(n_batches: int, batch: int, cfg, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Multi-crop batches (gpfm_jax's augmentation, the oracle's sizes) of the real H&E tiles in tests/data,
    in the oracle's torch layout: {"global": f32[B, 2, C, H, W], "local": f32[B, L, C, h, w]}."""
    from conftest import real_rgb_tiles

    from gpfm_jax.data.augment import MultiCropConfig, multi_crop

    tiles = real_rgb_tiles()
    mc = MultiCropConfig(global_size=cfg.crops.global_crops_size, local_size=cfg.crops.local_crops_size,
                         num_local_crops=cfg.crops.local_crops_number)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        views = [multi_crop(tiles[int(rng.integers(len(tiles)))], rng, mc) for _ in range(batch)]
        out.append({"global": np.stack([v["global_crops"] for v in views]).transpose(0, 1, 4, 2, 3),
                    "local": np.stack([v["local_crops"] for v in views]).transpose(0, 1, 4, 2, 3)})
    return out


def run_dynamics(mods, trainer, twin: JaxTwin, batches: list[dict], experts=None, expert_params=None,
                 targets_ref: dict | None = None, collate_seed: int = 0):
    """Both systems for len(batches) iterations on the same batches and masks; per-iteration loss terms of each
    (gpfm_jax's unweighted terms). With experts, `targets_ref["current"]` feeds the oracle's distillation loss."""
    from dinov2_oracle import collate

    b = trainer.cfg.train.batch_size_per_gpu
    grid = (trainer.cfg.crops.global_crops_size // trainer.cfg.student.patch_size,) * 2
    ref, ours = [], []
    state = twin.state
    for it, crops in enumerate(batches):
        data = collate(mods, crops, trainer.cfg, seed=collate_seed + it)
        batch = jax_batch(data, b)
        if experts:
            targets_ref["current"] = expert_targets(experts, expert_params, batch, grid)
        ref.append(unweighted(oracle_terms(trainer.step(data, it))))
        state, metrics = twin.train_step(state, batch, expert_params or {})
        ours.append({k[len("loss/"):]: float(v) for k, v in metrics.items()
                     if k.startswith("loss/") and k != "loss/total"})
    twin.state = state
    return ref, ours


# ---------------------------------------------------------------------------------------------------------------
# GPFM on top of the oracle: expert distillation (docs/objective.md, heads and losses), which DINOv2 lacks


DISTILL_CLS = {"uni": 1.0, "phikon": 0.5, "conch": 1.0}
DISTILL_PATCH = {"uni": 0.25, "phikon": 0.125}


def standin_experts(embed_dim: int = 32, depth: int = 1, num_heads: int = 2, pooler_dim: int = 16, seed: int = 0):
    """Small random UNI / Phikon / CONCH stand-ins (gpfm_jax's, frozen): ({name: Teacher}, {name: params})."""
    from gpfm_jax.models.teachers import build_teacher, random_params, standin_spec

    experts, params = {}, {}
    for i, name in enumerate(DISTILL_CLS):
        teacher = build_teacher(standin_spec(name, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                             pooler_dim=pooler_dim))
        experts[name] = teacher
        size = teacher.spec.fixed_input_size or teacher.spec.vit.img_size
        params[name] = jax.tree_util.tree_map(
            jnp.asarray, random_params(teacher.module, (1, size, size, 3), seed=seed + i))
    return experts, params


def torch_distill_heads(mods, in_dim: int, experts, bottleneck: int = 32, seed: int = 0):
    """One DINOv2 DINOHead(nlayers=1) per teacher (GPFM builds its distillation heads this way)."""
    import torch

    from gpfm_jax.models.teachers import teacher_dims

    torch.manual_seed(seed)
    return torch.nn.ModuleDict({name: mods.DINOHead(in_dim=in_dim, out_dim=dim, nlayers=1, bottleneck_dim=bottleneck)
                                for name, dim in teacher_dims(experts).items()})


_TARGETS: dict[tuple, tuple] = {}  # (experts' ids, grid) -> (the experts, kept alive so ids stay theirs; jitted fn)


def expert_targets(experts, expert_params, batch: dict, grid) -> dict[str, dict[str, np.ndarray]]:
    """The experts' targets for a gpfm_jax batch, reordered to the oracle's view-major crop order. `teacher_targets`
    is written to run inside jit (as the step runs it); called eagerly, its modules' inner jits compiled again at
    every call (most of the 60-iteration test's time), so it is jitted once per set of experts and grid."""
    from gpfm_jax.models.teachers import teacher_targets

    key = (tuple((name, id(t)) for name, t in experts.items()), tuple(grid))
    if key not in _TARGETS:
        _TARGETS[key] = (experts, jax.jit(lambda p, x: teacher_targets(experts, p, x, student_grid=tuple(grid))))
    g = batch["global_crops"]
    b, v = g.shape[:2]
    out = _TARGETS[key][1](expert_params, g.reshape((b * v,) + g.shape[2:]))
    to_view_major = lambda x: np.swapaxes(np.asarray(x).reshape((b, v) + x.shape[1:]), 0, 1).reshape(x.shape)  # noqa
    return {name: {k: to_view_major(x) for k, x in t.items()} for name, t in out.items()}


def torch_distill_loss(heads, targets_ref: dict):
    """SPEC's distillation terms in torch on the oracle's captured global-crop outputs (weighted terms, named as
    gpfm_jax's metrics): CLS 1 - mean cos; patch 0.9 (1 - mean cos) + 0.1 SmoothL1(beta 1)."""
    import torch
    import torch.nn.functional as F

    def loss(global_out):
        terms = {}
        for name, head in heads.items():
            device = global_out["x_norm_clstoken"].device  # numpy targets, or tensors already there (on a GPU)
            tg = {k: torch.as_tensor(v, device=device) for k, v in targets_ref["current"][name].items()}
            cls_pred = head(global_out["x_norm_clstoken"])
            cos = F.cosine_similarity(cls_pred, tg["cls"], dim=-1).mean()
            terms[f"distill/{name}/cls"] = DISTILL_CLS[name] * (1 - cos)
            if name in DISTILL_PATCH:
                p = head(global_out["x_norm_patchtokens"])
                cos = 1 - F.cosine_similarity(p, tg["patch"], dim=-1).mean()
                terms[f"distill/{name}/patch"] = DISTILL_PATCH[name] * (
                    0.9 * cos + 0.1 * F.smooth_l1_loss(p, tg["patch"], beta=1.0))
        return terms

    return loss


def unweighted(ref_terms: dict[str, float]) -> dict[str, float]:
    """Weighted torch distillation terms -> gpfm_jax's unweighted metric values."""
    out = dict(ref_terms)
    for k, v in ref_terms.items():
        if k.startswith("distill/"):
            _, name, part = k.split("/")
            out[k] = v / (DISTILL_CLS if part == "cls" else DISTILL_PATCH)[name]
    return out
