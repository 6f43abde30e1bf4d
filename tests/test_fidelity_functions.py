"""Function-level parity of gpfm_jax's objective against the official DINOv2 code (dinov2==0.0.1.dev2, the
codebase GPFM forked): losses, centring, Sinkhorn-Knopp, KoLeo, the DINO head, masks, param groups, schedules.

Every case runs on realistic and extreme inputs (logits far outside [-1, 1], teacher temperature 0.01, duplicate
embeddings, crops without a masked patch). Bound: 1e-5 relative (max |ours - ref| / max |ref|) unless stated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dinov2_oracle as O
from gpfm_jax import losses
from gpfm_jax.convert import head_keys
from gpfm_jax.data import masking
from gpfm_jax.models.heads import DINOHead
from gpfm_jax.step import optim, schedules

RTOL = 1e-5


@pytest.fixture(scope="module")
def mods():
    return O.oracle()


MEASURED: dict[str, float] = {}  # test -> worst relative difference seen, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nworst relative difference per test:")
    for name, value in sorted(MEASURED.items()):
        print(f"  {value:.1e}  {name}")


def rel(ours, ref) -> float:
    import os

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.max(np.abs(ref))
    value = float(np.max(np.abs(ours - ref)) / (scale if scale > 0 else 1.0))
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    MEASURED[test] = max(MEASURED.get(test, 0.0), value)
    return value


def t(x):
    return torch.from_numpy(np.asarray(x, np.float32))


# Teacher / student logits: realistic (|x| <= 1, what a weight-normalised head with g = 1 gives) and extreme.
LOGIT_SCALES = [("realistic", 1.0), ("extreme", 30.0)]
TEMPS = [0.07, 0.04, 0.01]


def logits(rng, shape, scale):
    return (scale * np.tanh(rng.normal(size=shape))).astype(np.float32) if scale == 1.0 else \
        (scale * rng.normal(size=shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------------- DINO / centre


@pytest.mark.parametrize("scale_name,scale", LOGIT_SCALES)
@pytest.mark.parametrize("temp", TEMPS)
def test_dino_loss_and_centering(mods, scale_name, scale, temp):
    rng = np.random.default_rng(int(temp * 1000) + int(scale))
    b, k, n_local = 6, 64, 4
    teacher = logits(rng, (2 * b, k), scale)
    s_global = logits(rng, (2 * b, k), scale)
    s_local = logits(rng, (n_local * b, k), scale)
    center = logits(rng, (k,), 0.5 * scale)

    ref = mods.loss.DINOLoss(k)
    ref.center = t(center)[None]
    ref_probs = ref.softmax_center_teacher(t(teacher), teacher_temp=temp)
    ours_probs = losses.centered_softmax(teacher, center, temp)
    assert rel(ours_probs, ref_probs) < RTOL

    # the oracle's bookkeeping: teacher views swapped for the global pairs, /18-style normalisation
    probs = ref_probs.view(2, b, k)
    swapped = torch.cat((probs[1], probs[0]))
    n_terms = 2 + 2 * n_local
    ref_loss = (float(ref([t(s_global)], [swapped])) * 2 + float(ref(list(t(s_local).chunk(n_local)), list(probs))))
    ref_loss /= n_terms
    ours_loss = losses.dino_loss(s_global.reshape(2, b, k), np.asarray(ours_probs).reshape(2, b, k),
                                 s_local.reshape(n_local, b, k))
    assert rel(ours_loss, ref_loss) < RTOL

    # centre: the lazy update applied at the next softmax_center_teacher call
    ref.update_center(t(teacher))
    ref.apply_center_update()
    ours_center = losses.update_center(jnp.asarray(center), losses.batch_mean(teacher), 0.9)
    assert rel(ours_center, ref.center[0]) < RTOL


def test_dino_center_starts_at_zero_and_first_call_applies_nothing(mods):
    ref = mods.loss.DINOLoss(8)
    x = t(np.arange(16, dtype=np.float32).reshape(2, 8))
    ref.softmax_center_teacher(x, teacher_temp=0.04)
    assert torch.count_nonzero(ref.center) == 0
    np.testing.assert_array_equal(losses.init_center(8), ref.center[0].numpy())


@pytest.mark.parametrize("scale_name,scale", [("realistic", 1.0), ("large", 3.0)])
@pytest.mark.parametrize("temp", [0.07, 0.04])
def test_sinkhorn_knopp_dino(mods, scale_name, scale, temp):
    rng = np.random.default_rng(7)
    x = (scale * np.tanh(rng.normal(size=(24, 96)))).astype(np.float32)  # up to 3 / 0.04 = 75 < log(f32 max)
    ref = mods.loss.DINOLoss(96).sinkhorn_knopp_teacher(t(x), teacher_temp=temp)
    assert torch.isfinite(ref).all()
    assert rel(losses.sinkhorn_knopp(x, temp), ref) < RTOL


def test_sinkhorn_knopp_beyond_the_oracles_float32_range(mods):
    """logits / tau > 88 overflow exp() in the oracle (inf -> NaN targets). gpfm_jax normalises in the log domain:
    the same function, finite. Checked against the oracle's own code run in float64 (its `.float()` cast removed
    by feeding a float64 copy of the function's arithmetic)."""
    rng = np.random.default_rng(8)
    x = logits(rng, (16, 32), 6.0)
    ref = mods.loss.DINOLoss(32).sinkhorn_knopp_teacher(t(x), teacher_temp=0.04)
    assert not torch.isfinite(ref).all()

    q = np.exp(x.astype(np.float64) / 0.04).T  # the oracle's algorithm, float64 (finite here)
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(1, keepdims=True)
        q /= q.shape[0]
        q /= q.sum(0, keepdims=True)
        q /= q.shape[1]
    ours = np.asarray(losses.sinkhorn_knopp(x, 0.04))
    assert np.isfinite(ours).all()
    assert rel(ours, (q * q.shape[1]).T) < RTOL


# ------------------------------------------------------------------------------------------------------- iBOT


@pytest.mark.parametrize("scale_name,scale", LOGIT_SCALES)
@pytest.mark.parametrize("temp", [0.07, 0.01])
def test_ibot_loss_centering_and_sinkhorn(mods, scale_name, scale, temp):
    rng = np.random.default_rng(11)
    n_crops, n_patches, k = 8, 16, 48
    masks = rng.random((n_crops, n_patches)) < 0.4
    masks[[1, 5]] = False  # crops without a masked patch count 1 in the denominator, 0 in the sum
    n = int(masks.sum())
    t_logits = logits(rng, (n, k), scale)
    s_logits = logits(rng, (n, k), scale)
    center = logits(rng, (k,), 0.5 * scale)

    ref = mods.loss.iBOTPatchLoss(k)
    ref.center = t(center)[None, None]
    ref_probs = ref.softmax_center_teacher(t(t_logits)[None], teacher_temp=temp)[0]
    ours_probs = losses.centered_softmax(t_logits, center, temp)
    assert rel(ours_probs, ref_probs) < RTOL

    m = torch.from_numpy(masks)
    weights = (1 / m.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(m)[m]  # the collate's masks_weight
    ref_loss = ref.forward_masked(t(s_logits), ref_probs, student_masks_flat=m, n_masked_patches=n,
                                  masks_weight=weights)
    # the same tokens through gpfm_jax's fixed-size buffer (with padding rows of weight 0)
    buffer = n + 5
    _, ours_weights, valid = losses.select_masked(jnp.zeros((n_crops, n_patches, 1)), masks, buffer)
    pad = lambda a: np.concatenate([a, np.zeros((buffer - n, k), np.float32)])  # noqa: E731
    ours_loss = losses.ibot_loss(pad(s_logits), pad(np.asarray(ours_probs)), ours_weights, n_crops)
    assert rel(ours_loss, ref_loss) < RTOL

    ref.update_center(t(t_logits)[None])
    ref.apply_center_update()
    ours_center = losses.update_center(jnp.asarray(center), losses.batch_mean(pad(t_logits), valid), 0.9)
    assert rel(ours_center, ref.center.reshape(-1)) < RTOL

    if scale == 1.0:  # the oracle's Sinkhorn overflows beyond (see the DINO case)
        O.init_single_process_group()
        ref_sk = ref.sinkhorn_knopp_teacher(t(t_logits), teacher_temp=max(temp, 0.04),
                                            n_masked_patches_tensor=torch.tensor([n]))
        ours_sk = losses.sinkhorn_knopp(pad(t_logits), max(temp, 0.04), valid=valid)[:n]
        assert rel(ours_sk, ref_sk) < RTOL


def test_ibot_centre_per_gpu_groups(mods):
    """With several GPUs the oracle's iBOT centre is the mean of the per-GPU token means (each GPU's
    reduce_center_update, then all_reduce / world_size): group_mean_weights reproduces it from the global buffer."""
    rng = np.random.default_rng(12)
    n_crops, n_patches, k, gpus = 8, 16, 24, 2
    masks = rng.random((n_crops, n_patches)) < np.linspace(0.1, 0.8, n_crops)[:, None]  # unequal counts per GPU
    tokens = rng.normal(size=(n_crops, n_patches, k)).astype(np.float32)
    per_gpu = []
    for g in range(gpus):
        part = slice(g * n_crops // gpus, (g + 1) * n_crops // gpus)
        ref = mods.loss.iBOTPatchLoss(k)
        ref.reduce_center_update(t(tokens[part][masks[part]])[None])  # [1, n_masked, K], as the oracle passes it
        per_gpu.append(ref.async_batch_center / ref.len_teacher_patch_tokens)
    ref_center = (sum(per_gpu) / gpus).reshape(-1)  # all_reduce(sum) / (len * world_size)
    buffer = int(masks.sum()) + 7
    selected, _, _ = losses.select_masked(jnp.asarray(tokens), masks, buffer)
    ours = losses.batch_mean(selected, losses.group_mean_weights(jnp.asarray(masks), buffer, gpus))
    assert rel(ours, ref_center) < RTOL
    one = losses.batch_mean(selected, losses.group_mean_weights(jnp.asarray(masks), buffer, 1))
    assert rel(one, tokens[masks].mean(0)) < RTOL


# ------------------------------------------------------------------------------------------------------ KoLeo


def koleo_cases():
    rng = np.random.default_rng(3)
    spread = rng.normal(size=(12, 32)).astype(np.float32)
    dup = spread.copy()
    dup[3] = dup[7]
    dup[0] = dup[1] = dup[2]
    scaled = spread * np.array([1e-3, 1.0, 1e3] * 4, np.float32)[:, None]  # norms far apart: normalised first
    return {"spread": spread, "duplicates": dup, "scaled": scaled}


@pytest.mark.parametrize("case", ["spread", "duplicates", "scaled"])
def test_koleo(mods, case):
    x = koleo_cases()[case]
    xt = t(x).requires_grad_(True)
    ref = mods.loss.KoLeoLoss()(xt)
    ref.backward()
    ours, grad = jax.value_and_grad(losses.koleo_loss)(jnp.asarray(x))
    assert rel(ours, ref.detach()) < RTOL
    # duplicates: torch's ||x - y + eps|| keeps the distance at eps*sqrt(D), so the gradient is finite but huge
    assert rel(grad, xt.grad) < RTOL
    # two views: summed, each view its own neighbours (the oracle's `sum(koleo(p) for p in cls.chunk(2))`)
    both = float(mods.loss.KoLeoLoss()(t(x[:6]))) + float(mods.loss.KoLeoLoss()(t(x[6:])))
    assert rel(losses.koleo_global_views(x.reshape(2, 6, -1)), both) < RTOL


# --------------------------------------------------------------------------------------------------- DINO head


@pytest.mark.parametrize("nlayers", [3, 1])
def test_dino_head_through_the_converter(mods, nlayers):
    torch.manual_seed(0)
    head = mods.DINOHead(in_dim=48, out_dim=80, nlayers=nlayers, hidden_dim=40, bottleneck_dim=24)
    with torch.no_grad():  # g away from 1 and logits well outside [-1, 1]
        head.last_layer.weight_g.copy_(torch.rand_like(head.last_layer.weight_g) * 20 + 0.5)
    x = np.random.default_rng(0).normal(size=(10, 48)).astype(np.float32) * 5
    state = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    params = head_keys.dino_head_from_torch(state, "head", prefix="")
    ours = DINOHead(out_dim=80, hidden_dim=40, bottleneck_dim=24, nlayers=nlayers).apply({"params": params}, x)
    ref = head(t(x)).detach()
    assert float(ref.abs().max()) > 5
    assert rel(ours, ref) < RTOL
    back = head_keys.dino_head_to_torch(params, prefix="")
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------- masks, driven draw for draw


class Stream:
    """One uniform stream read by both sides: the oracle's `random` module and gpfm_jax's numpy Generator calls."""

    def __init__(self, seed):
        self.u = np.random.default_rng(seed).random(200_000)
        self.i = 0

    def random(self):
        self.i += 1
        return float(self.u[self.i - 1])

    # Python `random` API (the oracle)
    def uniform(self, a, b):
        return a + (b - a) * self.random()

    def randint(self, a, b):
        return a + int(self.random() * (b - a + 1))

    def shuffle(self, x):
        for i in reversed(range(1, len(x))):
            j = int(self.random() * (i + 1))
            x[i], x[j] = x[j], x[i]

    # numpy Generator API (gpfm_jax)
    def integers(self, lo, hi):
        return lo + int(self.random() * (hi - lo))


@pytest.mark.parametrize("grid,n_crops", [(16, 24), (8, 16), (4, 8)])
def test_masks_equal_the_collate_draw_for_draw(mods, monkeypatch, grid, n_crops):
    """DINOv2's collate_data_and_cast + MaskingGenerator vs gpfm_jax's batch_masks, fed the same uniforms: the same
    per-crop mask ratios (float32 torch.linspace bins), the same blocks, the same shuffle, the same upper bound."""
    cfg = masking.MaskingConfig(grid=(grid, grid))
    for seed in range(5):
        ref_stream, our_stream = Stream(seed), Stream(seed)
        monkeypatch.setattr(mods.masking, "random", ref_stream)
        monkeypatch.setattr(mods.collate, "random", ref_stream)
        generator = mods.masking.MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
        crops = [({"global_crops": [torch.zeros(1)] * 2, "local_crops": [torch.zeros(1)]}, ())] * (n_crops // 2)
        ref = mods.collate.collate_data_and_cast(crops, (0.1, 0.5), 0.5, torch.float32, n_tokens=grid * grid,
                                                 mask_generator=generator)
        ours = masking.batch_masks(n_crops, our_stream, cfg)
        np.testing.assert_array_equal(ours, ref["collated_masks"].numpy())
        assert ref_stream.i == our_stream.i
        assert masking.max_masked_tokens(n_crops, cfg) == ref["upperbound"]
        assert ours.sum() == ref["mask_indices_list"].shape[0]


def test_float32_linspace_equals_torch():
    for n in range(1, 300):
        np.testing.assert_array_equal(masking.torch_linspace_f32(0.1, 0.5, n), torch.linspace(0.1, 0.5, n).numpy())


# ----------------------------------------------------------------------------------------------- param groups


@pytest.mark.parametrize("block_chunks", [0, 2])
def test_param_group_multipliers(mods, block_chunks):
    """get_params_groups_with_decay (lr multiplier, wd multiplier, is_last_layer) for every student parameter,
    backbone chunked or not, vs lr_multipliers / weight_decay_mask / last_layer_mask on the converted params."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import fidelity_bridge as FB

    cfg = O.gpfm_cfg(mods, depth=4)
    cfg.student.block_chunks = block_chunks
    model = mods.ssl_meta_arch.SSLMetaArch(cfg)
    groups = {}
    for m in model.student.values():
        for g in mods.param_groups.get_params_groups_with_decay(m, 0.9, 0.2):
            groups[id(g["params"])] = g
    state_fn = lambda mod, what: {k: np.asarray([groups[id(p)][what]] * p.numel(), np.float32).reshape(p.shape)  # noqa
                                  for k, p in mod.named_parameters()}
    tree = {}
    for what in ("lr_multiplier", "wd_multiplier", "is_last_layer"):
        _, tree[what] = FB.module_pair_to_jax(state_fn(model.student.backbone, what),
                                              state_fn(model.student.dino_head, what), 4, 1e-5)
    _, params = FB.module_pair_to_jax(FB.torch_state(model.student.backbone), FB.torch_state(model.student.dino_head),
                                      4, 1e-5)
    ours = {"lr_multiplier": optim.lr_multipliers(params, 0.9, 0.2),
            "wd_multiplier": optim.weight_decay_mask(params),
            "is_last_layer": optim.last_layer_mask(params)}
    for what in ours:
        ref = FB.flat(tree[what])
        mine = FB.flat(jax.tree_util.tree_map(lambda a, r: np.broadcast_to(np.asarray(a, np.float32), r.shape),
                                              ours[what], tree[what]))
        for k in ref:
            np.testing.assert_allclose(mine[k], ref[k], rtol=1e-6, err_msg=f"{what} {k}")


# -------------------------------------------------------------------------------------------------- schedules


def test_schedules_equal_build_schedulers(mods):
    """train.py's build_schedulers (CosineScheduler: lr warmup + cosine, wd cosine, momentum cosine, teacher
    temperature warmup, last-layer LR zeroed while frozen) vs make_schedules, at every iteration and beyond."""
    import fidelity_bridge as FB

    cfg = O.gpfm_cfg(mods, epoch_len=7, epochs=9, warmup_epochs=2, freeze_epochs=1, temp_warmup_epochs=4)
    ref = dict(zip(("lr", "weight_decay", "momentum", "teacher_temp", "last_layer_lr"),
                   mods.train.build_schedulers(cfg)))
    ours = schedules.make_schedules(FB.schedule_config(cfg), cfg.train.batch_size_per_gpu)
    its = np.arange(7 * 9 + 5)
    for name, sched in ref.items():
        mine = np.asarray(jax.vmap(getattr(ours, name))(jnp.asarray(its)))
        expected = np.asarray([sched[int(i)] for i in its])
        assert rel(mine, expected) < RTOL, name
    assert math.isclose(FB.schedule_config(cfg).base_lr * math.sqrt(8 / 1024), cfg.optim.lr, rel_tol=1e-12)
