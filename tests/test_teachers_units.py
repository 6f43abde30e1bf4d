"""Teacher registry, stand-ins, the target function (upsampling, dtype, stop_gradient) and format recognition.

Fast: tiny models only. The full-size parity checks against the PyTorch references are in test_teachers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import normalised_batch, require
from gpfm_jax.models.pooling import PooledViT
from gpfm_jax.models.vit import VisionTransformer
from gpfm_jax.encoders.teachers import load_teachers
from gpfm_jax.models.teachers import (
    TEACHERS,
    build_teacher,
    split_targets,
    standin_spec,
    teacher_dims,
    teacher_targets,
    upsample_patch_tokens,
)


def _port(teacher: str, path, out) -> int:
    from tools.port_teacher import main

    return main(["--teacher", teacher, "--torch", str(path), "--out", str(out)])


def test_registry_matches_spec():
    assert teacher_dims(TEACHERS) == {"uni": 1024, "phikon": 768, "conch": 512}
    uni, phikon, conch = TEACHERS["uni"], TEACHERS["phikon"], TEACHERS["conch"]
    assert (uni.vit.patch_size, uni.vit.depth, uni.vit.layerscale_init, uni.vit.use_mask_token) == (16, 24, 1e-5, False)
    assert (phikon.vit.embed_dim, phikon.vit.ln_eps, phikon.vit.layerscale_init) == (768, 1e-12, None)
    assert conch.vit.img_size == 448 and conch.vit.pos_embed_rule == "timm" and conch.patch_output is None
    assert (conch.pooler.dim, conch.pooler.num_heads, conch.pooler.num_queries, conch.pooler.proj_dim) == (512, 8, 1, 512)
    assert isinstance(build_teacher(uni).module, VisionTransformer)
    assert isinstance(build_teacher(conch).module, PooledViT)


@pytest.mark.parametrize("src,dst", [(14, 16), (14, 14), (7, 16)])
def test_upsampling_matches_torch_bicubic(src, dst):
    rng = np.random.default_rng(0)
    tokens = (3.0 * rng.standard_normal((2, src * src, 40))).astype(np.float32)
    ours = np.asarray(jax.jit(upsample_patch_tokens, static_argnums=(1, 2))(tokens, (src, src), (dst, dst)))
    x = torch.from_numpy(tokens).reshape(2, src, src, 40).permute(0, 3, 1, 2)
    ref = F.interpolate(x, size=(dst, dst), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(2, dst * dst, 40).numpy()
    err = float(np.max(np.abs(ours - ref)))
    print(f"upsample {src}->{dst}: max abs err {err:.2e}")
    assert err <= 1e-5


@pytest.fixture(scope="module")
def standins():
    return load_teachers({"uni": "standin", "phikon": None, "conch": "standin"}, seed=0)


def test_standin_targets_interface(standins):
    teachers, params = standins
    crops = normalised_batch(224, count=2)
    targets = jax.jit(lambda p, x: teacher_targets(teachers, p, x))(params, crops)
    dims = teacher_dims(teachers)
    assert set(targets) == {"uni", "phikon", "conch"}
    for name in ("uni", "phikon"):
        assert targets[name]["cls"].shape == (2, dims[name]) and targets[name]["patch"].shape == (2, 256, dims[name])
    assert set(targets["conch"]) == {"cls"} and targets["conch"]["cls"].shape == (2, dims["conch"])
    np.testing.assert_allclose(np.linalg.norm(np.asarray(targets["conch"]["cls"]), axis=-1), 1.0, atol=1e-5)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(targets))
    cls_t, patch_t = split_targets(targets)
    assert set(cls_t) == {"uni", "phikon", "conch"} and set(patch_t) == {"uni", "phikon"}


def test_targets_carry_no_gradient(standins):
    teachers, params = standins
    crops = jnp.asarray(normalised_batch(224, count=2))

    def loss(p, x):
        t = teacher_targets(teachers, p, x)
        return sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(t))

    g_params, g_crops = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, crops)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(g_params))
    assert float(jnp.max(jnp.abs(g_crops))) == 0.0


def test_bf16_compute_is_close_and_returns_f32(standins):
    from gpfm_jax.convert.layout import stack_blocks

    teachers32, params = standins
    # bf16 compute with the scanned layout (what an accelerator run uses), same numbers as the f32 stand-ins
    teachers16 = {k: build_teacher(t.spec, dtype="bfloat16", scan_layers=True) for k, t in teachers32.items()}
    scanned = {k: ({**v, "trunk": stack_blocks(v["trunk"])} if "trunk" in v else stack_blocks(v)) for k, v in params.items()}
    crops = normalised_batch(224, count=2)
    t16 = jax.jit(lambda p, x: teacher_targets(teachers16, p, x))(scanned, crops)
    t32 = jax.jit(lambda p, x: teacher_targets(teachers32, p, x))(params, crops)
    for name in t32:
        for key in t32[name]:
            assert t16[name][key].dtype == jnp.float32
            a, b = np.asarray(t16[name][key]), np.asarray(t32[name][key])
            rel = np.max(np.abs(a - b)) / np.max(np.abs(b))
            assert rel < 5e-2, (name, key, rel)


def test_phikon_refuses_other_input_sizes(standins):
    with pytest.raises(ValueError, match="224x224 input only"):  # the real model (HF ViT, no interpolation)
        build_teacher(TEACHERS["phikon"]).apply({}, jnp.zeros((1, 256, 256, 3)))
    teachers, params = standins  # its stand-in is not the reference: any size
    assert standin_spec("phikon").fixed_input_size is None
    assert teachers["phikon"].apply(params["phikon"], jnp.zeros((1, 112, 112, 3)))["cls"].shape[0] == 1


def test_standin_keeps_structure():
    spec = standin_spec("conch")
    assert spec.pooler.context_dim == spec.vit.embed_dim and spec.cls_output == "image_embedding"
    assert spec.vit.img_size == 448 and spec.patch_output is None


# --------------------------------------------------------------------------------------- format recognition (tiny)


def test_hf_vit_file_given_as_uni_is_refused(tmp_path, capsys):
    transformers = require("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = transformers.ViTModel(cfg)
    model.save_pretrained(tmp_path / "hf")
    assert _port("uni", tmp_path / "hf" / "model.safetensors", tmp_path / "b") == 1
    err = capsys.readouterr().err
    assert "Hugging Face ViTModel" in err and "--teacher phikon" in err


def test_timm_file_given_as_conch_is_refused(tmp_path, capsys):
    timm = require("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert _port("conch", tmp_path / "pytorch_model.bin", tmp_path / "b") == 1
    err = capsys.readouterr().err
    assert "timm VisionTransformer" in err and "--teacher uni" in err


def test_conch_file_given_as_phikon_is_refused(tmp_path, capsys):
    # Only the keys matter for recognising the format: a CoCa-shaped dict of small tensors is enough.
    path = tmp_path / "coca_like.bin"
    torch.save({"visual.trunk.cls_token": torch.zeros(1, 1, 8), "text.positional_embedding": torch.zeros(4, 8)}, path)
    assert _port("phikon", path, tmp_path / "b") == 1
    err = capsys.readouterr().err
    assert "CONCH CoCa" in err and "--teacher conch" in err


def test_code_carrying_pickle_is_refused(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"cls_token": Evil()}))
    assert _port("uni", path, tmp_path / "b") == 1
    captured = capsys.readouterr()
    assert "refused" in captured.err and "this must never run" not in captured.out
