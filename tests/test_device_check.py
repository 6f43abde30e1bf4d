"""tools/device_check.py at toy sizes on the CPU: every section runs and its figures are the right ones."""

from __future__ import annotations

import json

from tools.device_check import main


def test_device_check_tiny_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    assert main(["--tiny", "--devices", "1", "--iters", "3", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    s = report["sections"]
    assert list(s) == ["env", "step", "attention", "extraction", "features"] and all(v["ok"] for v in s.values())
    step = s["step"]
    assert step["img_per_s_per_device"] == step["per_device_batch"] / step["step_s"] > 0
    assert step["mfu"] > 0 and step["loss"] == step["loss"]  # finite loss
    assert step["model_flops_per_step"] == step["executed_flops_per_step"] > 0
    assert step["planner"]["peak_bytes"] > 0 and step["planner"]["collective_bytes"] == 0  # one device
    # off a GPU the attention section checks the same padding + key mask through XLA, in fp32: exact
    assert s["attention"]["dtype"] == "float32"
    assert max(s["attention"]["max_abs_diff"].values()) < 1e-5
    assert s["extraction"]["jax_tiles_per_s"] > 0 and s["extraction"]["timm_tiles_per_s"] > 0
    f = s["features"]
    assert f["jax_fp32_vs_timm_fp32"]["max_abs_diff_over_norm"] < 1e-5  # converted weights: the same encoder
    assert f["bf16_vs_fp32"]["min_cosine"] > 0.999


def test_device_check_keeps_earlier_sections_when_a_later_one_fails(tmp_path, monkeypatch):
    import tools.device_check as dc

    def broken(devices, args):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(dc, "attention_section", broken)
    out = tmp_path / "check.json"
    assert main(["--tiny", "--devices", "1", "--sections", "env,attention", "--out", str(out)]) == 1
    s = json.loads(out.read_text())["sections"]
    assert s["env"]["ok"] and not s["attention"]["ok"] and "simulated failure" in s["attention"]["error"]
