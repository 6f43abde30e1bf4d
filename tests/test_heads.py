"""DINO/iBOT head and distillation heads: layout, init, the weight-norm math, and parity with PyTorch DINOv2."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

from gpfm_jax.models.heads import DINOHead, DistillHeads, distill_head


def np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_head(p, x, nlayers=3):
    """SPEC: MLP with GELU, L2-normalise, W = g * v / ||v|| per output unit, no bias."""
    if nlayers == 1:
        h = x @ p["mlp"]["kernel"] + p["mlp"]["bias"]
    else:
        h = x
        for i in range(nlayers):
            h = h @ p[f"mlp_{2 * i}"]["kernel"] + p[f"mlp_{2 * i}"]["bias"]
            if i < nlayers - 1:
                h = np_gelu(h)
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    v, g = p["last_layer"]["weight_v"], p["last_layer"]["weight_g"]
    return h @ (v / np.linalg.norm(v, axis=0, keepdims=True) * g)


def _init(module, x):
    return nn.meta.unbox(module.init(jax.random.key(0), x)["params"])


def test_dino_head_layout_init_and_math():
    head = DINOHead(out_dim=64, hidden_dim=32, bottleneck_dim=8)
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    boxed = head.init(jax.random.key(0), x)["params"]
    p = nn.meta.unbox(boxed)
    shapes = jax.tree_util.tree_map(lambda a: a.shape, p)
    assert shapes == {
        "mlp_0": {"kernel": (16, 32), "bias": (32,)},
        "mlp_2": {"kernel": (32, 32), "bias": (32,)},
        "mlp_4": {"kernel": (32, 8), "bias": (8,)},
        "last_layer": {"weight_v": (8, 64), "weight_g": (64,)},
    }
    assert boxed["last_layer"]["weight_v"].names == ("head_bottleneck", "prototypes")
    assert boxed["mlp_2"]["kernel"].names == ("head_hidden", "head_hidden_out")
    for name in ("mlp_0", "mlp_2", "mlp_4"):
        assert not np.any(p[name]["bias"])
        k = np.asarray(p[name]["kernel"])
        assert np.abs(k).max() <= 0.02 * 2 + 1e-6 and 0.01 < k.std() < 0.025  # trunc-normal(0.02) at +-2 std
    np.testing.assert_array_equal(p["last_layer"]["weight_g"], np.ones(64))
    assert np.abs(np.asarray(p["last_layer"]["weight_v"])).max() <= 1 / math.sqrt(8)  # torch Linear default
    p = jax.tree_util.tree_map(np.asarray, p)
    p["last_layer"]["weight_g"] = np.linspace(0.5, 2.0, 64, dtype=np.float32)  # trainable g enters the math
    out = head.apply({"params": p}, x)
    np.testing.assert_allclose(out, np_head(p, x), rtol=1e-5, atol=1e-5)
    # unit bottleneck and unit-norm prototypes: |logit_k| <= g_k
    assert np.all(np.abs(np.asarray(out)) <= p["last_layer"]["weight_g"] + 1e-5)


def test_distill_heads_per_teacher():
    heads = DistillHeads({"uni": 12, "phikon": 10, "conch": 6}, bottleneck_dim=4)
    x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype(np.float32)  # the same head maps [B, N, D] patches
    p = _init(heads, x)
    assert jax.tree_util.tree_map(lambda a: a.shape, p["uni"]) == {
        "mlp": {"kernel": (16, 4), "bias": (4,)}, "last_layer": {"weight_v": (4, 12), "weight_g": (12,)}}
    out = heads.apply({"params": p}, x)
    assert {k: v.shape for k, v in out.items()} == {"uni": (2, 3, 12), "phikon": (2, 3, 10), "conch": (2, 3, 6)}
    p_np = jax.tree_util.tree_map(np.asarray, p)
    np.testing.assert_allclose(out["phikon"], np_head(p_np["phikon"], x, nlayers=1), rtol=1e-5, atol=1e-5)
    only = heads.apply({"params": p}, x[:, 0], teachers=("conch",))
    assert list(only) == ["conch"] and only["conch"].shape == (2, 6)


def test_full_size_shapes_and_bf16_compute():
    x = jax.ShapeDtypeStruct((4, 1024), jnp.float32)
    shapes = jax.eval_shape(lambda: _init(DINOHead(), jnp.zeros((4, 1024))))
    assert shapes["last_layer"]["weight_v"].shape == (256, 65536) and shapes["mlp_0"]["kernel"].shape == (1024, 2048)
    assert jax.eval_shape(DINOHead().init_with_output, jax.random.key(0), x)[0].shape == (4, 65536)
    d = jax.eval_shape(lambda: _init(distill_head(768), jnp.zeros((4, 1024))))
    assert d["mlp"]["kernel"].shape == (1024, 256) and d["last_layer"]["weight_v"].shape == (256, 768)
    head = DINOHead(out_dim=64, hidden_dim=32, bottleneck_dim=8, dtype="bfloat16")
    p = _init(head, jnp.zeros((2, 16)))
    assert p["mlp_0"]["kernel"].dtype == jnp.float32  # fp32 master params
    assert head.apply({"params": p}, jnp.ones((2, 16))).dtype == jnp.bfloat16


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # DINOv2 uses the old API: weight_g/weight_v keys
def test_matches_pytorch_dinov2_head_after_mechanical_mapping():
    torch = require("torch")
    tnn = torch.nn
    torch.manual_seed(0)
    mlp = tnn.Sequential(tnn.Linear(16, 32), tnn.GELU(), tnn.Linear(32, 32), tnn.GELU(), tnn.Linear(32, 8))
    last = tnn.utils.weight_norm(tnn.Linear(8, 64, bias=False))
    with torch.no_grad():
        last.weight_g.copy_(torch.rand(64, 1) + 0.5)
    sd = {f"mlp.{k}": v for k, v in mlp.state_dict().items()} | {f"last_layer.{k}": v for k, v in last.state_dict().items()}
    # the mechanical map: mlp.{i}.weight -> mlp_{i}/kernel (transposed); weight_g (K,1) -> (K,); weight_v -> .T
    p = {f"mlp_{i}": {"kernel": sd[f"mlp.{i}.weight"].numpy().T, "bias": sd[f"mlp.{i}.bias"].numpy()} for i in (0, 2, 4)}
    p["last_layer"] = {"weight_g": sd["last_layer.weight_g"].numpy()[:, 0], "weight_v": sd["last_layer.weight_v"].numpy().T}
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = last(torch.nn.functional.normalize(mlp(x), dim=-1, p=2)).numpy()
    out = DINOHead(out_dim=64, hidden_dim=32, bottleneck_dim=8).apply({"params": p}, x.numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
