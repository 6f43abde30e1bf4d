"""gpfm-bench's text task types: report and slide_vqa cells on a synthetic `reports` dataset and a (tile) vqa cell
on a synthetic `tiles` dataset keep every test
sample's generated text (tile vqa: the chosen answer), the report recomputes the corpus metrics from it, and graded synthetic encoders are
ranked in order of their signal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpfm_jax.encoder_bench.report import build_report
from gpfm_jax.encoder_bench.run import run_suite
from gpfm_jax.encoder_bench.suite import SuiteError, load_suite
from gpfm_jax.text import metrics as text_metrics

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

TINY = """epochs = {epochs}
lr = 3e-3
lr_decay = 0.95
clip_value = 1.0
batch_size = 8
beam = 2
width = 32
heads = 2
layers = 1
encoder_layers = 1
dropout = 0.0
"""
SUITE = """name = "text"
seed = 0
[encoders.s0]
synthetic = 0.0
seed = 1
[encoders.s2]
synthetic = 2.5
seed = 2
[encoders.s4]
synthetic = 4.0
seed = 3
[datasets.rep]
synthetic = "reports"
n = 200
patients = 200
[datasets.tiles]
synthetic = "tiles"
n = 300
classes = 3
patients = 30
[tasks.rep-report]
type = "report"
dataset = "rep"
region_size = 4
memory_slots = 16
max_length = 16
min_count = 1
""" + TINY.format(epochs=20) + """[tasks.rep-vqa]
type = "slide_vqa"
dataset = "rep"
max_length = 6
max_question = 8
""" + TINY.format(epochs=12) + """[tasks.tile-vqa]
type = "vqa"
dataset = "tiles"
max_length = 4
max_question = 8
""" + TINY.format(epochs=12)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):  # cache_dir: test_text_synthetic compiles the same programs
    tmp = tmp_path_factory.mktemp("text_bench")
    (tmp / "suite.toml").write_text(SUITE)
    stats = run_suite(tmp / "suite.toml", tmp / "out", progress=False)
    assert stats.evaluated == 9
    return tmp / "out"


def test_graded_encoders_ranked_in_order(run_dir):
    rep = build_report(run_dir, replicates=200)
    for task in ("rep-report", "rep-vqa", "tile-vqa"):
        m = rep["tasks"][task]["metrics"][rep["tasks"][task]["metric"]]
        assert m["s0"]["value"] < m["s2"]["value"] < m["s4"]["value"], (task, m)
    assert rep["tasks"]["rep-report"]["text_metrics"]["s4"]["bleu_4"] > rep["tasks"]["rep-report"]["text_metrics"][
        "s0"]["bleu_4"] + 0.2
    assert rep["ranking"]["per_encoder"]["s4"]["avg_rank"] == 1.0


def test_cells_keep_texts_and_the_report_recomputes_metrics(run_dir):
    run = json.loads((run_dir / "run.json").read_text())
    cache = run_dir / "cache" / "cells"
    for task in ("rep-report", "rep-vqa", "tile-vqa"):
        cell = json.loads((cache / f"{run['cells'][task]['s4']}.json").read_text())
        texts = cell["texts"]
        assert len(texts["prediction"]) == len(cell["rows"]["id"]) == len(cell["values"]["rouge_l"])
        stats = text_metrics.text_stats([h.split() for h in texts["prediction"]],
                                        [[r.split()] for r in texts["reference"]])
        again = text_metrics.caption_metrics(stats)
        for k, v in cell["extra"]["metrics"].items():  # what gpfm-eval computed when the cell ran
            if k in again:
                assert abs(float(again[k]) - v) < 1e-9, (task, k)
        assert np.mean(cell["values"]["rouge_l"]) == pytest.approx(float(again["rouge_l"]))


def test_text_tasks_need_a_reports_dataset(tmp_path):
    bad = SUITE.replace('synthetic = "reports"', 'synthetic = "slides"').split("[tasks.tile-vqa]")[0]
    (tmp_path / "s.toml").write_text(bad)
    with pytest.raises(SuiteError, match="tasks.rep-report.dataset: .*text tasks run on synthetic"):
        load_suite(tmp_path / "s.toml")
