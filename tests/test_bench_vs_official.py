"""tools/bench_vs_official.py on the CPU at its tiny config (issue 27): the official DINOv2/GPFM step (the fidelity
oracle's) and gpfm_jax's production step agree on one step's losses, so both are timed and the ratio printed; made
unequal on purpose (a weight of the official student, or the official KoLeo weight), it refuses: exit code 2, one
line naming the loss that differs, no timing and no ratio. The three runs share the compiled fp32 check program."""

from __future__ import annotations

import json

import pytest

from conftest import require

require("torch")
require("dinov2")

from tools import bench_vs_official as bench  # noqa: E402

FAST = ["--warmup", "1", "--rounds", "1", "--iters", "2"]


def test_equal_steps_are_timed_and_the_ratio_printed(tmp_path, capsys):
    out = tmp_path / "vs.json"
    assert bench.main(["--size", "tiny", *FAST, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    c, t = r["check"], r["timing"]
    # every loss term (DINO, iBOT, KoLeo, 5 distillation terms) and the total, each within the oracle test's bound
    assert c["equal"] and c["losses"] == 9 and c["rtol"] == 1e-5 and 0 <= c["worst_relative"] <= 1e-5
    assert t["batch"] == 4 and r["batches_tried"] == []
    for side in ("official", "gpfm_jax"):
        assert len(t["rounds_s"][side]) == 1 and t["iteration_s"][side] == t["rounds_s"][side][0] > 0
        assert t["img_per_s"][side] == pytest.approx(4 / t["iteration_s"][side])
    assert t["ratio"] == pytest.approx(t["img_per_s"]["gpfm_jax"] / t["img_per_s"]["official"])
    assert t["model_flops_per_step"] > 0 and t["jax_program_bytes"] > 0 and t["max_rss_bytes_both"] > 0
    assert t["last_loss"] == t["last_loss"]  # finite after the timed steps
    assert f"ratio gpfm_jax / official: {t['ratio']:.3f}" in text and "caveat: CPU figures" in text


@pytest.mark.parametrize("perturb, loss", [("weight", "dino"), ("koleo-weight", "koleo")])
def test_unequal_steps_are_refused(perturb, loss, tmp_path, capsys):
    out = tmp_path / "vs.json"
    assert bench.main(["--size", "tiny", *FAST, "--perturb", perturb, "--json", str(out)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"refused: loss '{loss}' differs") and "ratio" in lines[0]
    assert "img/s" not in lines[0]
    assert json.loads(out.read_text()) == {"equal": False, "refused": lines[0]}
