"""tools/device_check.py at toy sizes on the CPU: every section of the device command runs and its figures are the
right ones; the deadline skips what no longer fits; the levers change one config field each."""

from __future__ import annotations

import pytest

import json

from tools.device_check import BUDGET_S, main

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it


def test_device_check_tiny_writes_every_section(tmp_path):
    """The device command (--all, issue 27) at toy sizes, plus the encoder sections: one process, the step compiled
    once (step, profile and the levers' inputs), one lever (the crop layout: a program of its own, beside the step's
    remat) to keep it short; the other levers' configs are checked without a compile below."""
    out = tmp_path / "check.json"
    assert main(["--tiny", "--devices", "1", "--iters", "3", "--warmup", "1", "--all", "--sections",
                 "attention,extraction,features", "--levers", "no_concat_crops",
                 "--train-dir", str(tmp_path / "scratch"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    s = report["sections"]
    assert list(s) == ["env", "vs_official", "step", "levers", "train", "profile", "attention", "extraction",
                       "features"] and all(v["ok"] for v in s.values()), s
    assert all(v["budget_s"] == BUDGET_S[k] > 0 for k, v in s.items())
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
    _check_profile(s["profile"], tmp_path)
    _check_train(s["train"], tmp_path)
    _check_levers(s["levers"], step)
    v = s["vs_official"]  # tools/bench_vs_official.py at its tiny size; its JSON beside the report
    assert v["check"]["equal"] and v["check"]["worst_relative"] <= 1e-5
    assert v["timing"]["ratio"] == v["timing"]["img_per_s"]["gpfm_jax"] / v["timing"]["img_per_s"]["official"] > 0
    assert json.loads((tmp_path / v["json"]).read_text())["timing"] == v["timing"]


def _check_levers(lev, step):
    """The lever's step really runs with its one change (the crop layout; the step's remat kept), timed like the step
    section, beside the config's row."""
    assert lev["baseline"]["img_per_s_per_device"] == step["img_per_s_per_device"]
    var = lev["variants"]
    assert list(var) == ["no_concat_crops"]
    c = var["no_concat_crops"]
    assert (c["remat"], c["concat_crops"], c["attention_impl"]) == (step["remat"], False, step["attention_impl"])
    assert c["img_per_s_per_device"] == c["per_device_batch"] / c["step_s"] > 0 and c["loss"] == c["loss"]
    assert c["speedup_vs_config"] == c["img_per_s_per_device"] / step["img_per_s_per_device"]
    assert c["model_flops_per_step"] == step["model_flops_per_step"] and c["program_peak_bytes"] > 0


def test_lever_variants_change_one_field_of_the_official_config():
    """No compile: each lever's config is the official one with exactly the named field changed (so a lever row
    compares like with like), and --tiny's remat_none is the demo config itself (not run twice)."""
    import dataclasses

    from tools.device_common import step_config
    from tools.device_levers import VARIANTS

    base = step_config(False, 1)
    assert (base.compute.remat_policy, base.compute.concat_crops, base.model.vit.attention_impl) == (
        "dots_saveable", True, "auto")
    for name, changes in VARIANTS.items():
        cfg = step_config(False, 1, changes)
        (path, value), = changes.items()
        node_b, node_c = base, cfg
        for part in path.split(".")[:-1]:
            node_b, node_c = getattr(node_b, part), getattr(node_c, part)
        leaf = path.split(".")[-1]
        assert getattr(node_c, leaf) == value != getattr(node_b, leaf), name
        assert dataclasses.replace(node_c, **{leaf: getattr(node_b, leaf)}) == node_b, name
    assert step_config(True, 1, VARIANTS["remat_none"]) == step_config(True, 1)


def test_deadline_skips_sections_whose_budget_exceeds_the_time_left(tmp_path):
    out = tmp_path / "check.json"
    assert main(["--tiny", "--devices", "1", "--sections", "env,step", "--deadline-s", "60", "--out", str(out)]) == 0
    s = json.loads(out.read_text())["sections"]
    assert s["env"]["ok"] and s["env"]["budget_s"] == 10  # env fits, the step's 75 s do not: skipped, not failed
    assert s["step"]["ok"] is None and s["step"]["skipped"].startswith("its budget (75 s) exceeds the")
def _check_profile(p, out_dir):
    """The per-op table beside the JSON: consistent figures, and its ops are the step's real XLA ops, found in the
    trace (read here independently) and in the compiled HLO (opcode and category known)."""
    from jax.profiler import ProfileData

    table = json.loads((out_dir / p["table_json"]).read_text())
    assert (out_dir / p["table_md"]).read_text().count("\n| ") == len(table["top_ops"]) + 1  # header + rows
    rows = table["top_ops"]
    assert 0 < len(rows) <= 30 and table["distinct_ops"] >= len(rows) and table["steps"] == 3
    shares = [r["share"] for r in rows]
    assert shares == sorted(shares, reverse=True) and all(0 < x <= 1 for x in shares)
    assert abs(sum(shares) - table["top_share"]) < 1e-9 and table["top_share"] <= 1 + 1e-9
    assert abs(sum(table["by_category"].values()) - 1) < 1e-6
    ms = sum(r["ms_per_step"] for r in rows)  # shares are of the summed op time
    assert abs(ms / (table["op_time_s_per_step"] * 1e3) - table["top_share"]) < 1e-6
    assert 0 < table["busy_s_per_step"] <= table["wall_s_per_step"]
    assert abs(table["busy_over_wall"] - table["busy_s_per_step"] / table["wall_s_per_step"]) < 1e-9
    assert all(r["opcode"] != "?" and r["category"] != "?" for r in rows)  # instructions of the compiled module
    assert {"matmul", "elementwise fusion"} <= set(table["by_category"])
    trace_ops = set()
    for plane in ProfileData.from_file(str(out_dir / p["trace"])).planes:
        for line in plane.lines:
            trace_ops |= {dict(e.stats).get("hlo_op") for e in line.events}
    assert {r["op"] for r in rows} <= trace_ops


def test_device_check_keeps_earlier_sections_when_a_later_one_fails(tmp_path, monkeypatch):
    import tools.device_check as dc

    def broken(devices, args):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(dc, "attention_section", broken)
    out = tmp_path / "check.json"
    assert main(["--tiny", "--devices", "1", "--sections", "env,attention", "--out", str(out)]) == 1
    s = json.loads(out.read_text())["sections"]
    assert s["env"]["ok"] and not s["attention"]["ok"] and "simulated failure" in s["attention"]["error"]


def test_op_table_on_a_gpu_like_trace():
    """Two streams of one GPU (kernels carry hlo_op / hlo_module stats, as CUPTI events do): exact op times, the
    overlap counted once in busy time, another module's kernel left out, host-side events of the same ops too."""
    from jax.profiler import ProfileData

    from tools.profile_ops import _exclusive, op_table

    def event(meta, start_us, dur_us, op, module=12):
        return (f"events {{ metadata_id: {meta} offset_ps: {start_us * 1000000} duration_ps: {dur_us * 1000000} "
                f"stats {{ metadata_id: 1 ref_value: {op} }} stats {{ metadata_id: 2 ref_value: {module} }} }}")

    names = {11: "fusion.1", 12: "jit_step", 13: "custom-call.2", 14: "all-gather-start", 15: "jit_other"}
    text = ("planes { id: 1 name: \"/device:GPU:0\" "
            "lines { id: 1 name: \"Stream #7(Compute)\" timestamp_ns: 1000 "
            + event(1, 0, 4, 11) + event(2, 5, 1, 13) + event(1, 10, 2, 11) + event(1, 20, 50, 11, module=15) + " } "
            "lines { id: 2 name: \"Stream #8(Compute)\" timestamp_ns: 1000 " + event(3, 3, 1, 14) + " } "
            + " ".join(f"event_metadata {{ key: {k} value {{ id: {k} name: \"k{k}\" }} }}" for k in (1, 2, 3))
            + " stat_metadata { key: 1 value { id: 1 name: \"hlo_op\" } }"
            + " stat_metadata { key: 2 value { id: 2 name: \"hlo_module\" } } "
            + " ".join(f"stat_metadata {{ key: {k} value {{ id: {k} name: \"{v}\" }} }}" for k, v in names.items())
            + " }")
    gpu_lines = text[text.index("lines {"):text.index("event_metadata")]
    host = text.replace(gpu_lines, "lines { id: 3 name: \"python\" timestamp_ns: 1000 " + event(1, 0, 15, 11) + " } ")
    text += " " + host.replace("planes { id: 1 name: \"/device:GPU:0\"", "planes { id: 2 name: \"/host:CPU\"")
    data = ProfileData.from_serialized_xspace(ProfileData.text_proto_to_serialized_xspace(text))
    cats = {"fusion.1": ("fusion", "matmul"), "custom-call.2": ("custom-call", "attention"),
            "all-gather-start": ("all-gather-start", "collective")}
    t = op_table(data, "jit_step", cats, steps=2, wall_s=20e-6)
    rows = {r["op"]: r for r in t["top_ops"]}
    assert [r["op"] for r in t["top_ops"]] == ["fusion.1", "custom-call.2", "all-gather-start"]
    assert abs(rows["fusion.1"]["ms_per_step"] - 3e-3) < 1e-12 and rows["fusion.1"]["count_per_step"] == 1
    assert abs(rows["fusion.1"]["share"] - 6 / 8) < 1e-12 and abs(t["top_share"] - 1) < 1e-12
    assert abs(t["busy_s_per_step"] - 3.5e-6) < 1e-15  # [0,4] u [5,6] u [10,12]: 7 us (the collective overlaps)
    assert abs(t["op_time_s_per_step"] - 4e-6) < 1e-15 and abs(t["busy_over_wall"] - 0.35) < 1e-12
    assert t["by_category"] == {"matmul": 0.75, "attention": 0.125, "collective": 0.125}
    # a CPU `while` thunk encloses its body's ops: exclusive times, so nothing is counted twice
    assert _exclusive([(0, 10, "while"), (1, 3, "a"), (4, 8, "b"), (5, 6, "c")]) == {0: 4, 1: 2, 2: 3, 3: 1}


def _check_train(t, out_dir):
    """--train --tiny: gpfm-train (demo config shrunk) on the bundled slide with a grain worker; the figures are the
    run's own breakdown (recomputed here from the copied metrics.jsonl) and consistent."""
    assert t["iterations"] == 10 and t["steady_iterations"] == 8 and t["grain_workers"] == 1  # the config's count
    assert t["global_batch"] == 2 and "--config.steps=10" in t["command"] and "data.source=slides" in t["command"]
    assert 0 < t["end_to_end_img_per_s"] <= t["step_only_img_per_s"]
    assert abs(t["end_to_end_img_per_s"] - t["global_batch"] / t["iteration_s"]) < 1e-6
    assert 0 <= t["device_idle_share"] <= 1 and 0 <= t["loop_data_wait_share"] <= 1
    assert 0 < t["host_cores_whole_run"] <= t["host_cores_available"] + 0.5
    assert t["host_cores_steady"] is not None and t["host_cores_steady"] > 0
    rows = [json.loads(line) for line in (out_dir / t["metrics"]).read_text().splitlines()]
    steady = [r for r in rows if "perf/step_s" in r][2:]
    assert len(steady) == 8
    period = sum(r["perf/iteration_s"] for r in steady)
    assert abs(t["iteration_s"] - period / 8) < 1e-9
    assert abs(t["device_idle_share"] - (1 - sum(r["perf/step_s"] for r in steady) / period)) < 1e-9
    assert t["first_loss"] == t["first_loss"] and t["last_loss"] == t["last_loss"]  # finite


def test_random_bundles_load_as_the_registry_teacher(tmp_path, monkeypatch):
    """--train's random teachers are encoder bundles gpfm-train loads like ported ones (registry architecture checked,
    params in the module's layout). The registry entry is shrunk here: the real ones are hundreds of MB."""
    import numpy as np
    import jax

    from gpfm_jax.encoders.teachers import load_teacher
    from gpfm_jax.models.teachers import TEACHERS, standin_spec
    from tools.device_train import random_bundles

    monkeypatch.setitem(TEACHERS, "conch", standin_spec("conch", embed_dim=16, depth=2, num_heads=2, pooler_dim=8)
                        .replace(fixed_input_size=224))  # CONCH: the one with an attention pooler
    paths = random_bundles(tmp_path, names=("conch",), seed=3)
    teacher, params = load_teacher("conch", paths["conch"])
    assert teacher.spec.vit.depth == 2 and teacher.spec.pooler is not None
    want = teacher.init_params(3)  # what was written: the registry module's random params with that seed
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert random_bundles(tmp_path, names=("conch",))["conch"] == paths["conch"]  # kept, not rewritten
