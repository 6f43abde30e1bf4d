"""gpfm-bench run / report on a small synthetic suite (every task type): the content-addressed cache (a second run
recomputes nothing, a new encoder computes only its column, a renamed encoder nothing, a changed protocol only its
task), a SIGKILLed run resumes to exactly the uninterrupted result, the report's numbers agree with gpfm-eval's own
code, and bad suite files are refused naming the file and field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpfm_jax.encoder_bench import report as report_lib
from gpfm_jax.encoder_bench.cli import main as bench_main
from gpfm_jax.encoder_bench.run import run_suite
from gpfm_jax.encoder_bench.suite import SuiteError, load_suite

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = """
[encoders.weak]
synthetic = 0.4
seed = 1
[encoders.mid]
synthetic = 1.0
seed = 2
[encoders.strong]
synthetic = 2.0
seed = 3
"""
BODY = """
[datasets.tiles]
synthetic = "tiles"
n = 240
patients = 24
[datasets.slides]
synthetic = "slides"
n = 30
patients = 24
[datasets.surv]
synthetic = "survival"
n = 30
patients = 30

[tasks.knn]
type = "knn"
dataset = "tiles"
folds = 3
metrics = ["balanced_accuracy", "auc", "macro_f1"]
[tasks.linear]
type = "linear"
dataset = "tiles"
folds = 2
epochs = 8
[tasks.fewshot]
type = "fewshot"
dataset = "tiles"
folds = 3
shots = 2
episodes = 3
[tasks.retrieval]
type = "retrieval"
dataset = "tiles"
folds = 3
[tasks.mil]
type = "mil"
dataset = "slides"
folds = 3
model = "mean"
hidden_dim = 0
epochs = 4
lr = 0.01
[tasks.surv]
type = "survival"
dataset = "surv"
folds = 3
model = "mean"
hidden_dim = 0
epochs = 4
lr = 0.01
"""
NUM_TASKS, NUM_DATASETS = 6, 3


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _events(out: Path) -> list[dict]:
    """The events of the last run in out/log.jsonl."""
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    last = max(i for i, ev in enumerate(lines) if ev["event"] == "run_start")
    return lines[last:]


def _cells(out: Path) -> dict[str, dict]:
    run = json.loads((out / "run.json").read_text())
    cache = Path(run["cache"])
    return {key: json.loads((cache / "cells" / f"{key}.json").read_text())
            for per in run["cells"].values() for key in per.values()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The suite run once, uninterrupted."""
    root = tmp_path_factory.mktemp("bench")
    suite = _write(root / "suite.toml", 'name = "unit"\nseed = 0\n' + ENCODERS + BODY)
    stats = run_suite(suite, root / "out", progress=False)
    return root, suite, stats


def test_first_run_computes_every_cell_once(reference):
    root, _, stats = reference
    assert (stats.cells, stats.evaluated, stats.cached_cells) == (3 * NUM_TASKS, 3 * NUM_TASKS, 0)
    assert stats.extracted == 3 * NUM_DATASETS  # one feature set per encoder x dataset, shared by its tasks
    run = json.loads((root / "out" / "run.json").read_text())
    cells = _cells(root / "out")
    assert len(cells) == 3 * NUM_TASKS
    for cell in cells.values():  # what a report needs to recompute without retraining
        assert cell["protocol"]["seed"] == 0 and cell["seed"] == 0
        assert {"id", "unit", "group"} <= set(cell["rows"])
        assert any(k in cell for k in ("scores", "risk", "values"))
    assert run["tasks"]["knn"]["metrics"] == ["balanced_accuracy", "auc", "macro_f1"]


def test_second_run_recomputes_nothing(reference):
    root, suite, _ = reference
    stats = run_suite(suite, root / "out", progress=False)
    assert (stats.evaluated, stats.extracted, stats.cached_cells) == (0, 0, 3 * NUM_TASKS)
    kinds = {ev["event"] for ev in _events(root / "out")}
    assert kinds == {"run_start", "cell_cached", "run_end"}  # not even a feature file is opened


def test_new_encoder_computes_only_its_column_and_renames_nothing(reference):
    root, _, _ = reference
    cache = root / "out" / "cache"
    extra = ENCODERS + "[encoders.newcomer]\nsynthetic = 1.5\nseed = 9\n"
    suite2 = _write(root / "more.toml", 'name = "unit"\nseed = 0\n' + extra + BODY)
    stats = run_suite(suite2, root / "more", cache=cache, progress=False)
    assert (stats.evaluated, stats.cached_cells, stats.extracted) == (NUM_TASKS, 3 * NUM_TASKS, NUM_DATASETS)
    evs = _events(root / "more")
    assert {ev["encoder"] for ev in evs if ev["event"] in ("evaluate", "extract")} == {"newcomer"}
    # the same encoders under other names are the same content: nothing to compute
    renamed = ENCODERS.replace("weak", "w").replace("strong", "s")
    stats = run_suite(_write(root / "renamed.toml", 'name = "unit"\nseed = 0\n' + renamed + BODY), root / "ren",
                      cache=cache, progress=False)
    assert (stats.evaluated, stats.extracted) == (0, 0)
    # a changed protocol recomputes that task's column only, from the cached features
    changed = BODY.replace('type = "knn"\ndataset = "tiles"\n', 'type = "knn"\ndataset = "tiles"\nk = 5\n')
    stats = run_suite(_write(root / "k5.toml", 'name = "unit"\nseed = 0\n' + ENCODERS + changed), root / "k5",
                      cache=cache, progress=False)
    assert (stats.evaluated, stats.extracted, stats.cached_features) == (3, 0, 3)
    assert {ev["task"] for ev in _events(root / "k5") if ev["event"] == "evaluate"} == {"knn"}


def test_killed_run_resumes_to_the_uninterrupted_result(reference, tmp_path):
    root, suite, _ = reference
    out = tmp_path / "killed"
    cells_dir = out / "cache" / "cells"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "gpfm_jax.encoder_bench", "run", str(suite), "--out", str(out),
                             "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if cells_dir.is_dir() and len(list(cells_dir.glob("*.json"))) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    done = len(list(cells_dir.glob("*.json")))
    assert 4 <= done < 3 * NUM_TASKS
    stats = run_suite(suite, out, progress=False)
    assert (stats.cached_cells, stats.evaluated) == (done, 3 * NUM_TASKS - done)
    ref, resumed = _cells(root / "out"), _cells(out)
    assert ref.keys() == resumed.keys()
    for key in ref:
        a, b = dict(ref[key]), dict(resumed[key])
        for cell in (a, b):  # what the process measured, not what it computed
            cell.pop("seconds")
            cell["extra"].pop("num_compiles", None)
        assert a == b, key  # bitwise-equal predictions, seeds and protocol


def test_report_outputs_and_agreement_with_gpfm_eval(reference):
    from PIL import Image

    from gpfm_jax.evaluation import bags, data, knn

    root, _, _ = reference
    rep = report_lib.write_report(root / "out", replicates=200, seed=0)
    out = root / "out" / "report"
    for name in ("report.md", "metrics.csv", "report.json", "ranking.png", "cd_diagram.png", "win_probability.png"):
        assert (out / name).stat().st_size > 0, name
    for png in ("ranking.png", "cd_diagram.png", "win_probability.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) > 100
    md = (out / "report.md").read_text()
    assert "| **average rank** |" in md and "| knn | knn | balanced_accuracy |" in md
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * (3 + 2 + 2 + 2 + 2 + 1)  # header + encoders x (task x metric)
    js = json.loads((out / "report.json").read_text())
    assert js["replicates"] == 200 and set(js["ranking"]["per_encoder"]) == {"weak", "mid", "strong"}
    cells = _cells(root / "out")
    run = json.loads((root / "out" / "run.json").read_text())
    for enc in ("weak", "mid", "strong"):
        # MIL / survival: the report's value is gpfm-eval mil's own summary (mean over folds)
        for task, metric in (("mil", "auc"), ("surv", "c_index")):
            cell = cells[run["cells"][task][enc]]
            assert rep["tasks"][task]["metrics"][metric][enc]["value"] == pytest.approx(
                cell["extra"]["summary"][metric]["mean"], abs=2e-6)
        # kNN: the cell's scores are gpfm_jax.evaluation.knn on the cached features and the patient folds
        cell = cells[run["cells"]["knn"][enc]]
        h5 = [f for f in (root / "out" / "cache" / "features").glob("*.h5") if _encoder_of(f) == enc]
        assert len(h5) == 1
        x, paths = data.read_features(h5)
        table = {i: (y, u) for i, y, u in zip(cell["rows"]["id"], cell["rows"]["y"], cell["rows"]["unit"])}
        y = np.array([table[p][0] for p in paths])
        fold = bags.grouped_folds(y, [table[p][1] for p in paths], 3, 0)
        scores = np.array(cell["scores"])
        where = {(g, i): r for r, (g, i) in enumerate(zip(cell["rows"]["group"], cell["rows"]["id"]))}
        for f in range(3):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            ref = knn.knn_scores(x[tr], y[tr], x[te], len(cell["classes"]), 20, 0.07)
            np.testing.assert_array_equal(scores[[where[(f, paths[i])] for i in te]], ref)
    order = rep["ranking"]["order"]
    assert order == ["strong", "mid", "weak"]


def _encoder_of(h5_file: Path) -> str:
    import h5py

    with h5py.File(h5_file, "r") as f:
        return str(f.attrs["encoder"])


def test_report_names_missing_cells(reference, tmp_path):
    root, suite, _ = reference
    out = tmp_path / "partial"
    out.mkdir()
    run = json.loads((root / "out" / "run.json").read_text())
    run["cells"]["knn"]["mid"] = "0" * 64  # a cell that was never computed
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(report_lib.ReportError, match=r"mid x knn.*gpfm-bench run"):
        report_lib.build_report(out, replicates=10)
    assert bench_main(["report", str(tmp_path / "nowhere")]) == 2
    # cells that do not describe the same rows (here: one label changed) are refused, naming task and field
    run = json.loads((root / "out" / "run.json").read_text())
    cache = tmp_path / "cache"
    (cache / "cells").mkdir(parents=True)
    for per in run["cells"].values():
        for key in per.values():
            (cache / "cells" / f"{key}.json").write_bytes((Path(run["cache"]) / "cells" / f"{key}.json").read_bytes())
    bad = cache / "cells" / f"{run['cells']['fewshot']['strong']}.json"
    cell = json.loads(bad.read_text())
    cell["rows"]["y"][0] = 1 - cell["rows"]["y"][0]
    bad.write_text(json.dumps(cell))
    run["cache"] = str(cache)
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(report_lib.ReportError, match=r"task fewshot: encoder strong's y differ"):
        report_lib.build_report(out, replicates=10)


@pytest.mark.parametrize("text, match", [
    ('[encoders.a]\nsynthetic = 1.0\nsed = 3\n', r"encoders\.a\.sed: unknown field"),
    ('[encoders.a]\nsynthetic = "high"\n', r"encoders\.a\.synthetic: expected a number, got 'high'"),
    ('[encoders.a]\nbundle = "x"\nsynthetic = 1.0\n', r"encoders\.a\.bundle: give exactly one of"),
    ('[encoders."a b"]\nsynthetic = 1.0\n', r"encoders\.a b: names are"),
    ('[encoders.a]\nsynthetic = 1.0\n[encoders.b]\nsynthetic = 2.0\n[datasets.d]\nsynthetic = "tiles"\n'
     '[tasks.t]\ntype = "knn"\ndataset = "nope"\n', r"tasks\.t\.dataset: 'nope' is not a dataset"),
    ('[encoders.a]\nsynthetic = 1.0\n[encoders.b]\nsynthetic = 2.0\n[datasets.d]\nsynthetic = "tiles"\n'
     '[tasks.t]\ntype = "mil"\ndataset = "d"\n', r"tasks\.t\.dataset: a mil task needs a slides dataset"),
    ('[encoders.a]\nsynthetic = 1.0\n[encoders.b]\nsynthetic = 2.0\n[datasets.d]\nsynthetic = "tiles"\n'
     '[tasks.t]\ntype = "knn"\ndataset = "d"\nmetrics = ["c_index"]\n', r"tasks\.t\.metrics: a non-empty list"),
    ('[encoders.a]\nsynthetic = 1.0\n[encoders.b]\nbundle = "x"\n[datasets.d]\nsynthetic = "tiles"\n'
     '[tasks.t]\ntype = "knn"\ndataset = "d"\n', r"synthetic encoders .* only run with each other"),
    ('name = "x"\n[encoders\n', r"not valid TOML"),
])
def test_bad_suite_files_name_the_field(tmp_path, text, match, capsys):
    suite = _write(tmp_path / "bad.toml", text)
    with pytest.raises(SuiteError, match=match) as err:
        load_suite(suite)
    assert str(suite) in str(err.value)
    assert bench_main(["run", str(suite), "--out", str(tmp_path / "o")]) == 2
    assert "gpfm-bench: error:" in capsys.readouterr().err
