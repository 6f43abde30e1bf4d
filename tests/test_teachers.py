"""The ported teachers compute what their PyTorch references compute (UNI: timm, Phikon: transformers ViTModel,
CONCH: conch-fork CoCa), on real H&E tiles, through the real porting tool; plus the tool's strictness on bad files.

Each reference is built with random weights (LayerNorms and LayerScales included, so no block hides), saved in the
file format users have, ported with `tools/port_teacher.py` in-process, then compared: max abs error <= 1e-4 in fp32
for every training target (relative error printed).
"""

from __future__ import annotations

import gc
import json
import os

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import normalised_batch, randomize_torch_params_, require
from gpfm_jax.convert.bundle import load_bundle
from gpfm_jax.encoders import load_encoder
from gpfm_jax.encoders.teachers import load_teacher
from gpfm_jax.models.teachers import teacher_targets

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

timm = require("timm")
transformers = require("transformers")
ATOL = 1e-4


def _report(name: str, ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    rel = err / float(np.max(np.abs(ref)))
    print(f"{name}: max abs err {err:.2e}, relative to max |ref| {rel:.2e}")
    return err


def _randomize(model, seed: int) -> None:
    """conftest's randomisation, then every LayerNorm (incl. HF's final `layernorm` and CONCH's pooler norms, which
    conftest's name patterns miss) gets weight U(0.5, 1.5) and bias N(0, 0.1)."""
    randomize_torch_params_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _port(teacher: str, path, out) -> int:
    from tools.port_teacher import main

    return main(["--teacher", teacher, "--torch", str(path), "--out", str(out)])


def _torch_upsample(patch: np.ndarray, grid: int = 16) -> np.ndarray:
    """[B, 196, D] -> [B, grid*grid, D] with F.interpolate(size, bicubic, align_corners=False) (GPFM FeatureLoss)."""
    b, n, d = patch.shape
    side = int(round(n**0.5))
    x = torch.from_numpy(patch).reshape(b, side, side, d).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return y.permute(0, 2, 3, 1).reshape(b, grid * grid, d).numpy()


def _targets_and_outputs(name, teacher, params, images):
    def run(p, x):
        return teacher_targets({name: teacher}, {name: p}, x)[name], teacher.apply(p, x)

    return jax.jit(run)(params, images)


# ------------------------------------------------------------------------------------------------------------ UNI


@pytest.fixture(scope="module")
def uni(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uni")
    with torch.device("meta"):  # skip timm's init (seconds for ViT-L): every parameter is set right below
        model = timm.create_model("vit_large_patch16_224", pretrained=False, img_size=224, patch_size=16,
                                  init_values=1e-5, num_classes=0, dynamic_img_size=True)
    model = model.to_empty(device="cpu")
    assert not list(model.buffers())
    _randomize(model, seed=1)
    model.eval()
    path = tmp / "pytorch_model.bin"
    torch.save(model.state_dict(), path)  # UNI's file: a bare timm state dict
    images = normalised_batch(224, count=3)
    with torch.no_grad():
        ref = model.forward_features(_nchw(images)).numpy()
    del model
    gc.collect()
    assert _port("uni", path, tmp / "bundle") == 0
    path.unlink()
    return tmp / "bundle", images, ref


def test_uni_matches_timm_on_real_tiles(uni):
    bundle, images, ref = uni
    assert ref.shape == (3, 197, 1024)
    meta = json.loads((bundle / "encoder.json").read_text())
    assert meta["teacher"] == "uni" and meta["encoder"] == "vit" and meta["target_dims"] == {"cls": 1024, "patch": 1024}
    teacher, params = load_teacher("uni", bundle, scan_layers=True)  # scanned: same function, faster to compile
    targets, outputs = _targets_and_outputs("uni", teacher, params, images)
    errs = [
        _report("uni cls target", targets["cls"], ref[:, 0]),
        _report("uni patch tokens 14x14", outputs["patch"], ref[:, 1:]),
        _report("uni patch target 16x16", targets["patch"], _torch_upsample(ref[:, 1:])),
    ]
    assert max(errs) <= ATOL


# --------------------------------------------------------------------------------------------------------- Phikon


def _phikon_config():
    return transformers.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, image_size=224,
                                  patch_size=16, num_channels=3, qkv_bias=True)


@pytest.fixture(scope="module")
def phikon(tmp_path_factory):
    """Phikon as users have it: save_pretrained's model.safetensors (Hub layout), the same as pytorch_model.bin, and
    transformers>=5's in-memory state_dict layout. Pooler present (and ignored)."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("phikon")
    torch.manual_seed(0)
    model = transformers.ViTModel(_phikon_config(), add_pooling_layer=True)
    _randomize(model, seed=2)
    model.eval()
    model.save_pretrained(tmp / "hf")
    files = {"safetensors": tmp / "hf" / "model.safetensors", "bin": tmp / "pytorch_model.bin",
             "bin_v5_layout": tmp / "v5_layout.bin"}
    hub_state = load_file(str(files["safetensors"]))
    assert "encoder.layer.0.attention.attention.query.weight" in hub_state and "pooler.dense.weight" in hub_state
    torch.save(hub_state, files["bin"])
    torch.save(model.state_dict(), files["bin_v5_layout"])
    images = normalised_batch(224, count=3)
    with torch.no_grad():
        ref = model(pixel_values=_nchw(images)).last_hidden_state.numpy()
    del model, hub_state
    gc.collect()
    assert _port("phikon", files["safetensors"], tmp / "bundle") == 0
    return tmp, files, images, ref


def test_phikon_matches_transformers_on_real_tiles(phikon):
    tmp, _, images, ref = phikon
    assert ref.shape == (3, 197, 768)
    meta = json.loads((tmp / "bundle" / "encoder.json").read_text())
    assert meta["teacher"] == "phikon" and meta["vit"]["ln_eps"] == 1e-12 and meta["vit"]["layerscale_init"] is None
    assert any(rule.startswith("pooler.") for rule in meta["provenance"]["ignored_keys"])
    teacher, params = load_teacher("phikon", tmp / "bundle", scan_layers=True)  # as UNI (CONCH: unscanned)
    targets, outputs = _targets_and_outputs("phikon", teacher, params, images)
    errs = [
        _report("phikon cls target", targets["cls"], ref[:, 0]),
        _report("phikon patch tokens 14x14", outputs["patch"], ref[:, 1:]),
        _report("phikon patch target 16x16", targets["patch"], _torch_upsample(ref[:, 1:])),
    ]
    assert max(errs) <= ATOL


def test_phikon_bin_and_both_hf_layouts_give_the_same_params(phikon):
    tmp, files, _, _ = phikon
    reference, _ = load_bundle(tmp / "bundle")
    for kind in ("bin", "bin_v5_layout"):
        assert _port("phikon", files[kind], tmp / f"bundle_{kind}") == 0
        params, _ = load_bundle(tmp / f"bundle_{kind}")
        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params, reference)
        assert all(jax.tree_util.tree_leaves(same)), kind


def test_phikon_file_given_as_uni_is_refused(phikon, tmp_path, capsys):
    _, files, _, _ = phikon
    assert _port("uni", files["safetensors"], tmp_path / "b") == 1
    err = capsys.readouterr().err
    assert "Hugging Face ViTModel" in err and "--teacher phikon" in err
    assert not (tmp_path / "b").exists()


def test_missing_unknown_and_misshaped_keys_are_named(phikon, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, files, _, _ = phikon
    state = load_file(str(files["safetensors"]))
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "encoder.layer.5.attention.attention.key.bias"},
                    "missing key 'encoder.layer.5.attention.attention.key.bias'"),
        "unknown": ({**state, "encoder.layer.0.extra.weight": torch.zeros(3)},
                    "unexpected key 'encoder.layer.0.extra.weight'"),
        "shape": ({**state, "layernorm.weight": torch.zeros(384)},
                  "key 'layernorm.weight' has shape (384,), expected (768,)"),
    }
    for name, (bad_state, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad_state, str(path))
        assert _port("phikon", path, tmp_path / f"bundle_{name}") == 1, name
        assert message in capsys.readouterr().err, name
        path.unlink()


def test_truncated_files_are_refused(phikon, tmp_path, capsys):
    _, files, _, _ = phikon
    for kind in ("safetensors", "bin"):
        data = files[kind].read_bytes()
        path = tmp_path / f"truncated.{'safetensors' if kind == 'safetensors' else 'bin'}"
        path.write_bytes(data[: len(data) // 2])
        assert _port("phikon", path, tmp_path / f"bundle_{kind}") == 1, kind
        assert "truncated or corrupt" in capsys.readouterr().err, kind


# ---------------------------------------------------------------------------------------------------------- CONCH


def _coca_model():
    from conch.open_clip_custom import coca_model
    import conch.open_clip_custom as occ

    cfg_path = os.path.join(os.path.dirname(occ.__file__), "model_configs", "conch_ViT-B-16.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("custom_text", None)
    return coca_model.CoCa(**cfg)


@pytest.fixture(scope="module")
def conch(tmp_path_factory):
    require("conch.open_clip_custom")
    tmp = tmp_path_factory.mktemp("conch")
    with torch.device("meta"):  # skip CoCa's init (~400M params); every parameter is set right below
        model = _coca_model()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # text tower, text decoder, logit_scale: in the file, unused by the images
            p.zero_()
    _randomize(model.visual, seed=3)
    model.eval()
    path = tmp / "pytorch_model.bin"
    torch.save(model.state_dict(), path)  # the whole CoCa model, as MahmoodLab/CONCH ships it
    captured = {}
    model.visual.trunk.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
    model.visual.ln_contrast.register_forward_hook(lambda m, i, o: captured.__setitem__("pooled", o))
    refs = {}
    for size, count in ((224, 3), (448, 2)):
        images = normalised_batch(size, count=count)
        with torch.no_grad():
            embedding = model.encode_image(_nchw(images))  # normalize=True, proj_contrast=True: CONCH's default
            refs[size] = {
                "images": images,
                "image_embedding": embedding.numpy(),
                "projected": (captured["pooled"] @ model.visual.proj_contrast).numpy(),  # as VisualModel.forward
                "pooled": captured["pooled"].numpy(),  # = encode_image(proj_contrast=False, normalize=False)
                "tokens": captured["tokens"].numpy(),  # trunk.forward_features: all tokens after the final norm
            }
    del model
    captured.clear()  # the hooks die with the model
    gc.collect()
    assert _port("conch", path, tmp / "bundle") == 0
    path.unlink()
    return tmp / "bundle", refs


def _check_conch(outputs, ref, size) -> list[float]:
    return [
        _report(f"conch {size} image_embedding (target)", outputs["image_embedding"], ref["image_embedding"]),
        _report(f"conch {size} projected", outputs["projected"], ref["projected"]),
        _report(f"conch {size} pooled", outputs["pooled"], ref["pooled"]),
        _report(f"conch {size} trunk tokens", outputs["tokens"], ref["tokens"]),
    ]


def test_conch_matches_coca_at_224(conch):
    bundle, refs = conch
    meta = json.loads((bundle / "encoder.json").read_text())
    assert meta["teacher"] == "conch" and meta["encoder"] == "vit_attnpool" and meta["target_dims"]["cls"] == 512
    assert meta["preprocessing"]["input_size"] == 448
    ignored = " ".join(meta["provenance"]["ignored_keys"])
    for prefix in ("text.", "text_decoder.", "logit_scale", "visual.attn_pool_caption."):
        assert prefix in ignored
    ref = refs[224]
    teacher, params = load_teacher("conch", bundle)
    targets, outputs = _targets_and_outputs("conch", teacher, params, ref["images"])
    assert set(targets) == {"cls"}
    errs = [_report("conch 224 cls target", targets["cls"], ref["image_embedding"])] + _check_conch(outputs, ref, 224)
    assert max(errs) <= ATOL


def test_conch_matches_coca_at_native_448_via_load_encoder(conch):
    bundle, refs = conch
    ref = refs[448]
    module, params, _ = load_encoder(bundle)  # the generic bundle loader (feature extraction path)
    outputs = jax.jit(module.apply)({"params": params}, ref["images"])
    assert max(_check_conch(outputs, ref, 448)) <= ATOL

