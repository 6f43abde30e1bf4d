"""The official DINOv2 training code (PyPI `dinov2==0.0.1.dev2`, Meta's April 2023 release that GPFM forked) as a
test oracle on the CPU. Test-only: nothing here is used by the package.

The oracle needs two things this machine lacks:
  * xFormers (`ssl_meta_arch` asserts it): `install_xformers_standin()` registers plain-torch versions of the five
    ops it uses — `fmha.BlockDiagonalMask` (from_seqlens / from_tensor_list / split), `memory_efficient_attention`
    (exact softmax attention inside each block of the block-diagonal mask), `unbind`, `index_select_cat`,
    `scaled_index_add` and iBOT's `cross_entropy`;
  * CUDA (`forward_backward` calls `.cuda()` on the batch and `torch.cuda.synchronize()`): `cpu_cuda_calls()`
    turns both into no-ops while the oracle runs.
Two pieces of `train.py`'s loop work only under FSDP and are reproduced with the same arithmetic:
`update_teacher` (torch._foreach_mul_/add_ over each submodule's parameters; it gathers them from FSDP handles,
which a plain module has none of) and `v.clip_grad_norm_(clip)` per student submodule (FSDP's method; here
`torch.nn.utils.clip_grad_norm_` over the same parameters); the FSDP CUDA-stream sharing after the first step is
switched off. Everything else — SSLMetaArch, its losses, heads,
param groups, optimiser, schedulers, `apply_optim_scheduler`, the collate and the masking generator — is the
oracle's own code.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from functools import partial

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# xFormers stand-in


def install_xformers_standin(sdpa: bool = False) -> None:
    """`sdpa`: the attention inside each block through torch's `scaled_dot_product_attention` (its fused kernels on a
    GPU: tools/bench_vs_official.py); otherwise the plain softmax formula. Installed once per process."""
    import torch

    if "xformers.ops" in sys.modules:
        return

    class BlockDiagonalMask:
        def __init__(self, seqlens):
            self.seqlens = list(seqlens)
            self._batch_sizes = None

        @classmethod
        def from_seqlens(cls, seqlens):
            return cls(seqlens)

        @classmethod
        def from_tensor_list(cls, tensors):
            seqlens, batch_sizes = [], []
            for x in tensors:
                batch_sizes.append(x.shape[0])
                seqlens += [x.shape[1]] * x.shape[0]
            bias = cls(seqlens)
            bias._batch_sizes = batch_sizes
            return bias, torch.cat([x.reshape(1, -1, *x.shape[2:]) for x in tensors], dim=1)

        def split(self, x):
            out, start, s = [], 0, 0
            for b in self._batch_sizes:
                n = sum(self.seqlens[s : s + b])
                out.append(x[:, start : start + n].reshape(b, self.seqlens[s], *x.shape[2:]))
                start, s = start + n, s + b
            return out

    def attention(q, k, v):  # [B, N, H, d] -> [B, N, H, d], exact softmax attention
        scale = q.shape[-1] ** -0.5
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        if sdpa:
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)
        return (((qh * scale) @ kh.transpose(-2, -1)).softmax(-1) @ vh).transpose(1, 2)

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):
        # q, k, v: [B, N, H, d]; with a block-diagonal mask (B = 1), attention within each block only: runs of
        # equal-length blocks are attended as one batch
        if attn_bias is None:
            return attention(q, k, v)
        out, start, lens = [], 0, attn_bias.seqlens
        i = 0
        while i < len(lens):
            j = i
            while j < len(lens) and lens[j] == lens[i]:
                j += 1
            n, count = lens[i], j - i
            seg = [x[0, start : start + n * count].reshape(count, n, *x.shape[2:]) for x in (q, k, v)]
            out.append(attention(*seg).reshape(1, n * count, *q.shape[2:]))
            start, i = start + n * count, j
        return torch.cat(out, dim=1)

    def index_select_cat(sources, indices):
        return torch.cat([s[i].flatten() for s, i in zip(sources, indices)])

    def scaled_index_add(input, index, source, scaling=None, alpha=1.0):
        src = source if scaling is None else source * scaling
        return input.index_add(0, index, src, alpha=alpha)

    def cross_entropy(s, t, temp, bw_inplace=False):
        return -torch.sum(t * torch.log_softmax(s / temp, dim=-1), dim=-1)

    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.BlockDiagonalMask = BlockDiagonalMask
    fmha.MemoryEfficientAttentionFlashAttentionOp = None
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    ops.memory_efficient_attention = memory_efficient_attention
    ops.unbind = torch.unbind
    ops.index_select_cat = index_select_cat
    ops.scaled_index_add = scaled_index_add
    ops.cross_entropy = cross_entropy
    root = types.ModuleType("xformers")
    root.ops = ops
    sys.modules.update({"xformers": root, "xformers.ops": ops, "xformers.ops.fmha": fmha})


@contextlib.contextmanager
def cpu_cuda_calls():
    """`.cuda()` returns the tensor itself and `torch.cuda.synchronize()` does nothing, for the oracle's step."""
    import torch

    saved = torch.Tensor.cuda, torch.cuda.synchronize
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize = saved


def init_single_process_group() -> None:
    """iBOT's Sinkhorn-Knopp all-reduces its token count unconditionally: a 1-process gloo group makes that a no-op."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)


# ---------------------------------------------------------------------------------------------------------------
# The oracle, built from a config


def oracle():
    """The oracle's modules, imported after the stand-in is in place. One torch thread: the oracle's ops are tiny
    here and torch's thread pool stalls when the other core is busy (JAX runs beside it)."""
    import torch

    torch.set_num_threads(1)
    install_xformers_standin()
    import dinov2.data.collate as collate
    import dinov2.data.masking as masking
    import dinov2.loss as loss
    import dinov2.models.vision_transformer as vits
    import dinov2.train.ssl_meta_arch as ssl_meta_arch
    import dinov2.train.train as train
    import dinov2.utils.param_groups as param_groups
    import dinov2.utils.utils as utils
    from dinov2.configs import dinov2_default_config
    from dinov2.layers import DINOHead

    return types.SimpleNamespace(
        collate=collate, masking=masking, loss=loss, vits=vits, ssl_meta_arch=ssl_meta_arch, train=train,
        param_groups=param_groups, utils=utils, default_config=dinov2_default_config, DINOHead=DINOHead)


TINY = dict(embed_dim=64, depth=2, num_heads=4)


def register_tiny_arch(mods, **dims) -> str:
    """A CPU-sized DINOv2 ViT the config can name (`cfg.student.arch`), built like vit_small/large."""
    dims = {**TINY, **dims}
    name = "vit_fidelity_" + "_".join(str(dims[k]) for k in sorted(dims))
    if not hasattr(mods.vits, name):
        from dinov2.layers import MemEffAttention
        from dinov2.layers import NestedTensorBlock as Block

        def arch(patch_size=16, **kwargs):
            return mods.vits.DinoVisionTransformer(
                patch_size=patch_size, mlp_ratio=4, block_fn=partial(Block, attn_class=MemEffAttention),
                **dims, **kwargs)

        setattr(mods.vits, name, arch)
    return name


def gpfm_cfg(mods, *, batch_per_gpu=8, img=112, local=56, n_local=8, patch=14, out_dim=256, hidden=64,
             bottleneck=32, epoch_len=10, epochs=10, warmup_epochs=1, freeze_epochs=1, temp_warmup_epochs=3,
             centering="centering", drop_path=0.0, layerscale=1e-5, base_lr=4e-4, **arch):
    """The oracle's OmegaConf config carrying GPFM's settings (docs/objective.md) at a CPU size."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(mods.default_config)
    cfg.student.arch = register_tiny_arch(mods, **arch)
    cfg.student.patch_size = patch
    cfg.student.drop_path_rate = drop_path
    cfg.student.layerscale = layerscale
    cfg.student.block_chunks = 0
    cfg.crops.global_crops_size = img
    cfg.crops.local_crops_size = local
    cfg.crops.local_crops_number = n_local
    cfg.dino.head_n_prototypes = out_dim
    cfg.dino.head_hidden_dim = hidden
    cfg.dino.head_bottleneck_dim = bottleneck
    cfg.ibot.head_n_prototypes = out_dim
    cfg.train.batch_size_per_gpu = batch_per_gpu
    cfg.train.OFFICIAL_EPOCH_LENGTH = epoch_len
    cfg.train.centering = centering
    cfg.optim.epochs = epochs
    cfg.optim.warmup_epochs = warmup_epochs
    cfg.optim.freeze_last_layer_epochs = freeze_epochs
    cfg.teacher.warmup_teacher_temp_epochs = temp_warmup_epochs
    cfg.optim.base_lr = base_lr
    cfg.optim.lr = base_lr * math.sqrt(batch_per_gpu / 1024.0)  # apply_scaling_rules_to_cfg, one process
    cfg.compute_precision.grad_scaler = False
    return cfg


class OracleTrainer:
    """SSLMetaArch + the optimiser, schedulers and per-iteration body of `train.do_train`, in fp32 on the CPU."""

    def __init__(self, mods, cfg, seed: int = 0, extra_loss=None):
        import torch

        torch.manual_seed(seed)
        self.mods, self.cfg = mods, cfg
        self.model = mods.ssl_meta_arch.SSLMetaArch(cfg)
        for k, v in self.model.student.items():  # prepare_for_distributed_training, without the FSDP wrap
            self.model.teacher[k].load_state_dict(v.state_dict())
        self.model.train()
        self.model.need_to_synchronize_fsdp_streams = False  # it shares FSDP CUDA streams; none here
        self.optimizer = mods.train.build_optimizer(cfg, self.model.get_params_groups())
        (self.lr, self.wd, self.momentum, self.teacher_temp, self.last_layer_lr) = mods.train.build_schedulers(cfg)
        self.extra_loss = extra_loss

    def randomize_backbone(self, seed: int = 0) -> None:
        """A generic point in weight space instead of the init (LayerScale 1e-5 makes every image's CLS nearly the
        same vector, where KoLeo's nearest-neighbour distances are below fp32 resolution for the oracle itself):
        LayerNorm scales and LayerScale gammas in [0.5, 1.5), everything else N(0, 0.02); the EMA teacher copies it."""
        from conftest import randomize_torch_params_

        randomize_torch_params_(self.model.student.backbone, seed)
        self.model.teacher.backbone.load_state_dict(self.model.student.backbone.state_dict())

    def add_param_groups(self, module) -> None:
        """Extra student modules (GPFM's distillation heads): DINOv2's param-group rules, not clipped."""
        for g in self.mods.ssl_meta_arch.fuse_params_groups(
                self.mods.param_groups.get_params_groups_with_decay(module, self.cfg.optim.layerwise_decay,
                                                                    self.cfg.optim.patch_embed_lr_mult)):
            g["foreach"] = True
            self.optimizer.add_param_group(dict(g))

    def step(self, data: dict, iteration: int) -> dict[str, float]:
        """One iteration of do_train's loop body; returns the oracle's loss_dict as floats."""
        loss_dict = self.forward_backward(data, iteration)
        self.update(iteration)
        return loss_dict

    def forward_backward(self, data: dict, iteration: int) -> dict[str, float]:
        """Schedules applied, gradients computed (not yet clipped)."""
        lr, wd, last_lr = self.lr[iteration], self.wd[iteration], self.last_layer_lr[iteration]
        self.mods.train.apply_optim_scheduler(self.optimizer, lr, wd, last_lr)
        self.optimizer.zero_grad(set_to_none=True)
        with cpu_cuda_calls():
            loss_dict = self._forward_backward(data, self.teacher_temp[iteration])
        return {k: float(v.detach()) for k, v in loss_dict.items()}

    def update(self, iteration: int) -> None:
        """Clipping, the AdamW step and the EMA update of do_train's loop body."""
        import torch

        if self.cfg.optim.clip_grad:
            for v in self.model.student.values():  # FSDP's v.clip_grad_norm_(clip), per student submodule
                torch.nn.utils.clip_grad_norm_(v.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.update_teacher(self.momentum[iteration])

    def _forward_backward(self, data, temp):
        if self.extra_loss is None:
            return self.model.forward_backward(data, teacher_temp=temp)
        # GPFM adds its distillation terms to the same backward pass: capture the student's global-crop outputs
        # and add the extra loss to the accumulator the oracle backpropagates.
        model, captured, extra = self.model, {}, {}
        backbone = model.student.backbone
        original_features, original_backprop = backbone.forward_features, model.backprop_loss

        def features(x, masks=None):
            out = original_features(x, masks)
            if isinstance(x, list):
                captured["global"] = out[0]
            return out

        def backprop(loss):
            terms = self.extra_loss(captured["global"])
            extra.update({k: v.detach() for k, v in terms.items()})
            original_backprop(loss + sum(terms.values()))

        backbone.forward_features, model.backprop_loss = features, backprop
        try:
            loss_dict = model.forward_backward(data, teacher_temp=temp)
        finally:
            del backbone.forward_features, model.backprop_loss
        return {**loss_dict, **extra}

    def update_teacher(self, m: float) -> None:
        """SSLMetaArch.update_teacher's arithmetic over each submodule's (non-FSDP) parameter lists."""
        import torch

        with torch.no_grad():
            student, teacher = [], []
            for k in self.model.student.keys():
                student += list(self.model.student[k].parameters())
                teacher += list(self.model.teacher[k].parameters())
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, student, alpha=1 - m)

    def centers(self) -> dict[str, np.ndarray]:
        """Both centres with the pending (lazy) update applied, as the next iteration would use them."""
        out = {}
        for name, loss in (("dino", self.model.dino_loss), ("ibot", self.model.ibot_patch_loss)):
            loss.apply_center_update()
            out[name] = loss.center.detach().numpy().reshape(-1)
        return out


def collate(mods, crops: dict, cfg, seed: int) -> dict:
    """The oracle's collate (masks from its MaskingGenerator, Python `random` seeded), fp32.

    crops: {"global": f32[B, 2, C, H, W], "local": f32[B, L, C, h, w]} (torch layout).
    """
    import random

    import torch

    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    generator = mods.masking.MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    samples = [({"global_crops": list(torch.from_numpy(g)), "local_crops": list(torch.from_numpy(loc))}, ())
               for g, loc in zip(crops["global"], crops["local"])]
    random.seed(seed)
    return mods.collate.collate_data_and_cast(
        samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max), mask_probability=cfg.ibot.mask_sample_probability,
        dtype=torch.float32, n_tokens=grid * grid, mask_generator=generator)


def view_major_to_sample_major(x: np.ndarray, batch: int) -> np.ndarray:
    """[V * B, ...] (index v * B + i, the oracle's collate) -> [B, V, ...] (gpfm_jax's batch layout)."""
    return np.swapaxes(x.reshape((-1, batch) + x.shape[1:]), 0, 1)
