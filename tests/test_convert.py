"""Weight conversion: exact round trips in both formats, strict loading into timm, and clear errors on bad input."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from conftest import randomize_torch_params_, require
from gpfm_jax.convert import layout, vit_keys
from gpfm_jax.convert.student import import_vit
from gpfm_jax.convert.torch_io import CheckpointError, load_torch_file
from tools.convert_from_pytorch import main as from_pytorch
from tools.convert_to_pytorch import main as to_pytorch

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

timm = require("timm")
SMALL = dict(img_size=56, patch_size=14, embed_dim=384, depth=8, num_heads=6, init_values=1e-5, num_classes=0)


def _small_timm(seed: int = 0, **overrides):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(**{**SMALL, **overrides})
    randomize_torch_params_(model, seed)
    return model.eval()


def _assert_bit_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), f"{key} differs"


def _gpfm_release(model, depth: int, mask_token: torch.Tensor) -> dict:
    """A file shaped like the GitHub GPFM.pth: EMA teacher, 'backbone.' prefix, 4 block chunks, a DINO head."""
    chunk = depth // 4
    teacher = {}
    for key, value in model.state_dict().items():
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m:
            key = f"blocks.{int(m.group(1)) // chunk}.{m.group(1)}.{m.group(2)}"
        teacher[f"backbone.{key}"] = value.clone()
    teacher["backbone.mask_token"] = mask_token
    teacher["dino_head.mlp.0.weight"] = torch.randn(32, 384)
    teacher["dino_head.last_layer.weight_g"] = torch.ones(64, 1)
    return {"teacher": teacher}


def test_timm_vitl_round_trip_is_bit_exact_and_loads_strictly(vitl, tmp_path):
    model, bundle, _ = vitl
    want = model.state_dict()
    # Strict loading checks key names and shapes (the values are checked bit for bit before it): a model built on the
    # meta device has both without timm's seconds-long ViT-L init; assign=True takes the loaded tensors as they are.
    with torch.device("meta"):
        fresh = timm.create_model("vit_large_patch14_dinov2", img_size=224, init_values=1e-5, num_classes=0)
    for name in ("back.safetensors", "back.pth"):
        assert to_pytorch(["--checkpoint", str(bundle), "--format", "timm", "--out", str(tmp_path / name)]) == 0
        if name.endswith(".pth"):
            got = torch.load(tmp_path / name, weights_only=True)
        else:
            from safetensors.torch import load_file

            got = load_file(tmp_path / name)
        _assert_bit_equal(got, want)
        fresh.load_state_dict(got, strict=True, assign=True)


def test_gpfm_release_round_trip_and_official_key_handling(tmp_path):
    model = _small_timm(1)
    mask_token = torch.randn(1, 384)
    release = _gpfm_release(model, SMALL["depth"], mask_token)
    torch.save(release, tmp_path / "GPFM.pth")
    assert from_pytorch(["--torch", str(tmp_path / "GPFM.pth"), "--out", str(tmp_path / "bundle")]) == 0
    meta = json.loads((tmp_path / "bundle" / "encoder.json").read_text())
    assert meta["provenance"]["ignored_keys"] == ["dino_head.*"]
    assert meta["vit"]["depth"] == 8 and meta["vit"]["num_heads"] == 6 and meta["vit"]["img_size"] == 56

    assert to_pytorch(["--checkpoint", str(tmp_path / "bundle"), "--format", "gpfm", "--out", str(tmp_path / "o.pth")]) == 0
    exported = torch.load(tmp_path / "o.pth", weights_only=True)
    backbone = {k: v for k, v in release["teacher"].items() if k.startswith("backbone.")}
    _assert_bit_equal(exported["teacher"], backbone)
    # The official loader: take 'teacher', strip 'backbone.', load into the chunked DINOv2 layout. Un-chunking gives
    # timm's names; everything but the mask token must then load strictly.
    stripped = {k.removeprefix("backbone."): v for k, v in exported["teacher"].items()}
    assert all(re.match(r"blocks\.\d\.\d+\.", k) for k in stripped if k.startswith("blocks."))
    unchunked = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in stripped.items()}
    assert torch.equal(unchunked.pop("mask_token"), mask_token)
    _small_timm(2).load_state_dict(unchunked, strict=True)


def test_safetensors_input_and_scanned_unscanned_layouts_are_exact(tmp_path):
    from safetensors.torch import save_file

    model = _small_timm(3)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    params, cfg, ignored = import_vit(tmp_path / "m.safetensors")
    assert ignored == [] and cfg.depth == 8
    np.testing.assert_array_equal(params["mask_token"], np.zeros((1, 384), np.float32))  # timm has none: as at init
    scanned = layout.stack_blocks(params)
    assert scanned["blocks"]["mlp"]["fc1"]["kernel"].shape == (8, 384, 1536)
    back = layout.unstack_blocks(scanned)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    # Exporting from the scanned layout gives the same bits as the source file.
    canonical = vit_keys.vit_params_to_torch(layout.unstack_blocks(scanned), cfg)
    exported = {k: torch.from_numpy(v) for k, v in vit_keys.to_timm_state(canonical).items()}
    _assert_bit_equal(exported, model.state_dict())


def test_training_checkpoint_exports_the_ema_teacher_backbone(tmp_path):
    model = _small_timm(4)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    params, cfg, _ = import_vit(tmp_path / "m.pth")
    ckpt = tmp_path / "checkpoints"
    from gpfm_jax.convert.bundle import BUNDLE_FORMAT

    with ocp.CheckpointManager(ckpt) as manager:
        for step, scale in ((3, 2.0), (5, 1.0)):
            state = {
                "teacher": {"backbone": layout.stack_blocks(jax.tree_util.tree_map(lambda x: x * scale, params))},
                "student": {"backbone": jax.tree_util.tree_map(lambda x: x * 0, params)},
            }
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    (ckpt / "encoder.json").write_text(json.dumps({"format": BUNDLE_FORMAT, "version": 1, "encoder": "vit",
                                                  "vit": cfg.to_dict(), "preprocessing": {}}))
    assert to_pytorch(["--checkpoint", str(ckpt), "--format", "timm", "--out", str(tmp_path / "latest.pth")]) == 0
    _assert_bit_equal(torch.load(tmp_path / "latest.pth", weights_only=True), model.state_dict())
    assert to_pytorch(["--checkpoint", str(ckpt), "--step", "3", "--format", "timm", "--out", str(tmp_path / "s3.pth")]) == 0
    got = torch.load(tmp_path / "s3.pth", weights_only=True)
    assert torch.equal(got["pos_embed"], model.state_dict()["pos_embed"] * 2.0)
    assert to_pytorch(["--checkpoint", str(ckpt), "--step", "4", "--format", "timm", "--out", str(tmp_path / "x.pth")]) == 1


class _Payload:
    """Unpickling this would run a shell command (the attack weights_only=True prevents)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    model = _small_timm(5)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: not a readable PyTorch file"):
        load_torch_file(truncated)
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "full.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "full.safetensors").read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_torch_file(cut)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused"):
        load_torch_file(evil)
    assert not marker.exists(), "the pickle's payload ran"

    # A ViT-B file where a ViT-L is required: the first mismatching key is named with both shapes.
    vitb = _small_timm(6, embed_dim=768, num_heads=12, depth=12)
    torch.save(vitb.state_dict(), tmp_path / "vitb.pth")
    assert from_pytorch(["--torch", str(tmp_path / "vitb.pth"), "--out", str(tmp_path / "b"), "--arch", "vit_large_patch14"]) == 1
    err = capsys.readouterr().err
    assert "vitb.pth: key 'cls_token' has shape (1, 1, 768), expected (1, 1, 1024)" in err
    assert not (tmp_path / "b").exists()

    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.3.mlp.fc2.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.3\.mlp\.fc2\.bias'"):
        import_vit(tmp_path / "missing.pth")
    torch.save({**state, "head.weight": torch.zeros(3, 384)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'head\.weight'"):
        import_vit(tmp_path / "extra.pth")
    bad_shape = dict(state)
    bad_shape["blocks.2.attn.qkv.weight"] = torch.zeros(1152, 383)
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"key 'blocks\.2\.attn\.qkv\.weight' has shape \(1152, 383\)"):
        import_vit(tmp_path / "shape.pth")

    assert to_pytorch(["--checkpoint", str(tmp_path / "nope"), "--format", "timm", "--out", str(tmp_path / "n.pth")]) == 1
    assert "nope: no such folder" in capsys.readouterr().err


def test_checkpoint_written_on_8_devices_converts_on_a_1_device_machine(tmp_path):
    """The usual case: trained on a pod, converted on a laptop (orbax would refuse the writer's topology)."""
    import os
    import subprocess
    import sys

    from jax.sharding import PartitionSpec as P

    from gpfm_jax.convert.bundle import BUNDLE_FORMAT
    from gpfm_jax.step import sharding

    model = _small_timm(7)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    params, cfg, _ = import_vit(tmp_path / "m.pth")
    mesh = sharding.make_mesh(1, 8)
    placed = jax.device_put(layout.stack_blocks(params), sharding.state_shardings(layout.stack_blocks(params), mesh))
    assert placed["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, None, "fsdp")
    ckpt = tmp_path / "checkpoints"
    with ocp.CheckpointManager(ckpt) as manager:
        manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"teacher": {"backbone": placed}})))
    (ckpt / "encoder.json").write_text(json.dumps({"format": BUNDLE_FORMAT, "version": 1, "encoder": "vit",
                                                  "vit": cfg.to_dict(), "preprocessing": {}}))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device in the converting process
    out = tmp_path / "laptop.pth"
    result = subprocess.run([sys.executable, "tools/convert_to_pytorch.py", "--checkpoint", str(ckpt), "--format",
                             "timm", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_bit_equal(torch.load(out, weights_only=True), model.state_dict())
