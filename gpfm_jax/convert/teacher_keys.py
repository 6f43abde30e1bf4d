"""Strict key maps from the expert teachers' own PyTorch state dicts to our Flax params.

Three source formats, as users have them:
- "timm_vit"   (UNI `pytorch_model.bin`): a bare timm `VisionTransformer` state dict (cls_token, pos_embed,
               patch_embed.proj.*, blocks.{i}.*, norm.*), mapped by `vit_keys`.
- "hf_vit"     (Phikon `model.safetensors` / `pytorch_model.bin`): Hugging Face `ViTModel`. Both the layout in the
               files on the Hub / written by `save_pretrained` (`encoder.layer.{i}.attention.attention.query.*`, ...)
               and transformers>=5's in-memory layout (`layers.{i}.attention.q_proj.*`, ...) are read. Separate
               q/k/v are concatenated into our fused qkv. `pooler.dense.*` (and a `embeddings.mask_token`) are unused.
- "conch_coca" (CONCH `pytorch_model.bin`): the whole CoCa model. `visual.trunk.*` is a timm ViT; the contrastive
               attentional pooler, `visual.ln_contrast` and `visual.proj_contrast` are used; the text tower, the
               text decoder, `logit_scale` and the captioning pooler are unused.
Every key is used or matched by an explicit ignore rule; missing keys, unknown keys and shapes raise CheckpointError
naming the key. A file of another teacher's format is recognised and named in the error.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from gpfm_jax.convert import vit_keys
from gpfm_jax.convert.torch_io import CheckpointError
from gpfm_jax.models.pooling import PoolerConfig
from gpfm_jax.models.vit import ViTConfig

FORMATS = ("timm_vit", "hf_vit", "conch_coca")
FORMAT_DESCRIPTIONS = {
    "timm_vit": "a timm VisionTransformer state dict (UNI layout: 'blocks.{i}.attn.qkv.weight', ...)",
    "hf_vit": "a Hugging Face ViTModel state dict (Phikon layout: 'embeddings.*', 'encoder.layer.{i}.*')",
    "conch_coca": "a CONCH CoCa state dict ('visual.trunk.*', 'text.*', 'text_decoder.*')",
}
# Keys (exact) or prefixes (ending in '.') that a format holds but no teacher target needs.
IGNORED = {
    "timm_vit": (),
    "hf_vit": ("pooler.", "embeddings.mask_token"),
    "conch_coca": ("text.", "text_decoder.", "logit_scale", "visual.attn_pool_caption.", "visual.ln_caption."),
}
CONCH_TRUNK = "visual.trunk."
CONCH_POOL = "visual.attn_pool_contrast."


def detect_format(keys: Any) -> str | None:
    keys = set(keys)
    if any(k.startswith(CONCH_TRUNK) for k in keys):
        return "conch_coca"
    if any(k.startswith(("embeddings.patch_embeddings.", "encoder.layer.", "layers.")) for k in keys):
        return "hf_vit"
    if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm_vit"
    return None


def strip_wrappers(state: Mapping[str, Any], source: str) -> dict[str, Any]:
    """{'state_dict'|'model': {...}} -> inner dict; a DDP 'module.' prefix on every key is removed (as conch-fork)."""
    state = vit_keys.unwrap_state(state, source)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    for key, value in state.items():
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{source}: key {key!r} is not a tensor ({type(value).__name__})")
    return dict(state)


def _is_ignored(key: str, fmt: str) -> bool:
    return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in IGNORED[fmt])


def check_format(state: Mapping[str, Any], fmt: str, teacher: str, source: str) -> None:
    found = detect_format(state)
    if found is None:
        raise CheckpointError(
            f"{source}: not a recognised teacher state dict (first keys: {sorted(state)[:3]}); "
            f"--teacher {teacher} expects {FORMAT_DESCRIPTIONS[fmt]}"
        )
    if found != fmt:
        hint = {"timm_vit": "uni", "hf_vit": "phikon", "conch_coca": "conch"}[found]
        raise CheckpointError(
            f"{source}: this is {FORMAT_DESCRIPTIONS[found]}, but --teacher {teacher} expects "
            f"{FORMAT_DESCRIPTIONS[fmt]}. Is this the {hint} checkpoint (--teacher {hint})?"
        )


def _check_keys(
    state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], fmt: str, source: str
) -> list[str]:
    """Missing / unknown / mis-shaped keys raise; returns the ignored keys."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    ignored = sorted(k for k in state if k not in expected and _is_ignored(k, fmt))
    unknown = sorted(k for k in state if k not in expected and not _is_ignored(k, fmt))
    if unknown:
        raise CheckpointError(
            f"{source}: unexpected key {unknown[0]!r} for this architecture ({len(unknown)} unknown)"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(shape)} for this architecture"
            )
    return ignored


# ---------------------------------------------------------------------------------------------------- timm (UNI)


def timm_vit_params(state: Mapping[str, np.ndarray], cfg: ViTConfig, source: str) -> tuple[dict, list[str]]:
    expected = vit_keys.expected_torch_shapes(cfg)
    ignored = _check_keys(state, expected, "timm_vit", source)
    params = vit_keys.vit_params_from_torch({k: state[k] for k in expected}, cfg, source, optional=())
    return params, ignored


# ------------------------------------------------------------------------------------------ Hugging Face (Phikon)

# (hub / save_pretrained name, transformers>=5 name, canonical timm name); '{i}' = layer index
_HF_TOP = (
    ("embeddings.cls_token", "embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    ("embeddings.patch_embeddings.projection.bias", "embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    ("layernorm.weight", "layernorm.weight", "norm.weight"),
    ("layernorm.bias", "layernorm.bias", "norm.bias"),
)
_HF_BLOCK = (
    ("encoder.layer.{i}.layernorm_before.{p}", "layers.{i}.layernorm_before.{p}", "blocks.{i}.norm1.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "layers.{i}.attention.o_proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("encoder.layer.{i}.layernorm_after.{p}", "layers.{i}.layernorm_after.{p}", "blocks.{i}.norm2.{p}"),
    ("encoder.layer.{i}.intermediate.dense.{p}", "layers.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("encoder.layer.{i}.output.dense.{p}", "layers.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
)
_HF_QKV = (
    ("encoder.layer.{i}.attention.attention.query.{p}", "layers.{i}.attention.q_proj.{p}"),
    ("encoder.layer.{i}.attention.attention.key.{p}", "layers.{i}.attention.k_proj.{p}"),
    ("encoder.layer.{i}.attention.attention.value.{p}", "layers.{i}.attention.v_proj.{p}"),
)


def hf_vit_params(state: Mapping[str, np.ndarray], cfg: ViTConfig, source: str) -> tuple[dict, list[str]]:
    """HF ViTModel state -> unscanned Flax params of a `VisionTransformer` with `cfg` (qkv fused as [q; k; v])."""
    if cfg.layerscale_init is not None or cfg.use_mask_token or cfg.num_register_tokens or not cfg.qkv_bias:
        raise ValueError("an HF ViTModel maps onto a ViT without LayerScale, mask token or registers, with qkv bias")
    layout = 1 if any(k.startswith("layers.") for k in state) else 0
    canonical_shapes = vit_keys.expected_torch_shapes(cfg)
    expected: dict[str, tuple[int, ...]] = {}
    rename: dict[str, str] = {}  # source key -> canonical key (qkv handled apart)
    for names in _HF_TOP:
        expected[names[layout]] = canonical_shapes[names[2]]
        rename[names[layout]] = names[2]
    d = cfg.embed_dim
    for i in range(cfg.depth):
        for p in ("weight", "bias"):
            for names in _HF_BLOCK:
                src, dst = names[layout].format(i=i, p=p), names[2].format(i=i, p=p)
                expected[src] = canonical_shapes[dst]
                rename[src] = dst
            for names in _HF_QKV:
                expected[names[layout].format(i=i, p=p)] = (d, d) if p == "weight" else (d,)
    ignored = _check_keys(state, expected, "hf_vit", source)
    canonical = {dst: state[src] for src, dst in rename.items()}
    for i in range(cfg.depth):
        for p in ("weight", "bias"):
            parts = [state[names[layout].format(i=i, p=p)] for names in _HF_QKV]
            canonical[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(parts, axis=0)  # torch (out, in): stack outputs
    params = vit_keys.vit_params_from_torch(canonical, cfg, source, optional=())
    return params, ignored


# --------------------------------------------------------------------------------------------------- CONCH (CoCa)


def pooler_torch_shapes(pcfg: PoolerConfig) -> dict[str, tuple[int, ...]]:
    d, c = pcfg.dim, pcfg.context_dim
    shapes = {
        CONCH_POOL + "query": (pcfg.num_queries, d),
        CONCH_POOL + "attn.q_proj_weight": (d, d),
        CONCH_POOL + "attn.k_proj_weight": (d, c),
        CONCH_POOL + "attn.v_proj_weight": (d, c),
        CONCH_POOL + "attn.in_proj_bias": (3 * d,),
        CONCH_POOL + "attn.out_proj.weight": (d, d),
        CONCH_POOL + "attn.out_proj.bias": (d,),
        CONCH_POOL + "ln_q.weight": (d,),
        CONCH_POOL + "ln_q.bias": (d,),
        CONCH_POOL + "ln_k.weight": (c,),
        CONCH_POOL + "ln_k.bias": (c,),
        "visual.ln_contrast.weight": (d,),
        "visual.ln_contrast.bias": (d,),
    }
    if pcfg.proj_dim is not None:
        shapes["visual.proj_contrast"] = (d, pcfg.proj_dim)
    return shapes


def _pooler_params(state: Mapping[str, np.ndarray], pcfg: PoolerConfig) -> dict[str, Any]:
    """nn.MultiheadAttention(kdim=vdim!=embed_dim) -> q/k/v_proj Dense (kernel = W^T); proj_contrast used as is."""
    d = pcfg.dim
    pre = CONCH_POOL
    bias = state[pre + "attn.in_proj_bias"]
    attn = {
        "query": state[pre + "query"],
        "ln_q": {"scale": state[pre + "ln_q.weight"], "bias": state[pre + "ln_q.bias"]},
        "ln_k": {"scale": state[pre + "ln_k.weight"], "bias": state[pre + "ln_k.bias"]},
        "q_proj": {"kernel": state[pre + "attn.q_proj_weight"].T, "bias": bias[:d]},
        "k_proj": {"kernel": state[pre + "attn.k_proj_weight"].T, "bias": bias[d : 2 * d]},
        "v_proj": {"kernel": state[pre + "attn.v_proj_weight"].T, "bias": bias[2 * d :]},
        "out_proj": {"kernel": state[pre + "attn.out_proj.weight"].T, "bias": state[pre + "attn.out_proj.bias"]},
    }
    head: dict[str, Any] = {
        "attn_pool": attn,
        "ln_post": {"scale": state["visual.ln_contrast.weight"], "bias": state["visual.ln_contrast.bias"]},
    }
    if pcfg.proj_dim is not None:
        head["proj"] = state["visual.proj_contrast"]  # VisualModel: pooled @ proj_contrast (no transpose)
    return _contiguous(head)


def _contiguous(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree)


def conch_params(
    state: Mapping[str, np.ndarray], cfg: ViTConfig, pcfg: PoolerConfig, source: str
) -> tuple[dict, list[str]]:
    """CoCa state -> {"trunk": ViT params, "pooler": AttentionalPoolHead params} for `PooledViT`."""
    trunk_shapes = {CONCH_TRUNK + k: v for k, v in vit_keys.expected_torch_shapes(cfg).items()}
    expected = {**trunk_shapes, **pooler_torch_shapes(pcfg)}
    ignored = _check_keys(state, expected, "conch_coca", source)
    trunk_state = {k[len(CONCH_TRUNK) :]: state[k] for k in trunk_shapes}
    trunk = vit_keys.vit_params_from_torch(trunk_state, cfg, source, optional=())
    return {"trunk": trunk, "pooler": _pooler_params(state, pcfg)}, ignored


def summarize_ignored(ignored: list[str], fmt: str) -> list[str]:
    """Ignored keys grouped by the rule that matched them (for the bundle's provenance)."""
    rules = []
    for rule in IGNORED[fmt]:
        count = sum(1 for k in ignored if k == rule or (rule.endswith(".") and k.startswith(rule)))
        if count:
            rules.append(f"{rule}{'*' if rule.endswith('.') else ''} ({count} keys)")
    return rules

