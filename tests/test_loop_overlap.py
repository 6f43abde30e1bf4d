"""The host loop overlaps data and compute (issue 11, item 3): with a data source slowed to D s per batch and a step
slowed to S s on the device (tests/fault_injection.py), an iteration takes about max(D, S), not D + S; the time
breakdown lands in metrics.jsonl and TensorBoard; the non-finite stop acts one step late and still saves nothing bad.
(Bitwise resume with the prefetching loop: test_train_run.py's SIGKILL test and test_faults.py's soak.)"""

from __future__ import annotations

import statistics

import numpy as np
import pytest

import fault_injection
from helpers_train import tiny
from gpfm_jax.train import loop
from gpfm_jax.train.faults import committed_steps
from gpfm_jax.train.metrics_writer import read_metrics

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

PERF = ("perf/data_wait_s", "perf/data_s", "perf/h2d_s", "perf/step_s", "perf/iteration_s", "perf/images_per_s")



@pytest.fixture(scope="module", autouse=True)
def _compile_cache(cache_dir):
    """The session's shared compilation cache (conftest.py), on for every test here."""
    return cache_dir


def _tiny(**changes):
    """The tiny run config on one device of this process."""
    return tiny(one_device=True, **changes)


@pytest.mark.serial  # races a deadline / measures time: alone under xdist (conftest.py)
def test_slow_data_and_slow_step_overlap(tmp_path, monkeypatch):
    delay = 0.4
    release = fault_injection.install(monkeypatch.setattr, slow_data_s=delay, slow_step_s=delay)
    try:
        result = loop.train(_tiny(**{"steps": 10, "checkpoint.every": 100, "log.every": 1}), tmp_path / "overlap")
    finally:
        release.set()
    assert result.status == "done"
    rows = read_metrics(tmp_path / "overlap")
    assert sorted(rows) == list(range(10))
    assert all(k in rows[i] for i in range(1, 10) for k in PERF)  # the first row has no iteration time
    steady = [rows[i] for i in range(3, 9)]  # after compilation, before the final save
    med = {k: statistics.median(r[k] for r in steady) for k in PERF}
    print({k: round(v, 3) for k, v in med.items()})
    assert med["perf/data_s"] >= delay and med["perf/step_s"] >= delay  # each delay is where it should be
    both = med["perf/data_s"] + med["perf/h2d_s"] + med["perf/step_s"]
    assert med["perf/iteration_s"] < 0.75 * both, med  # overlapped: not the sum ...
    assert med["perf/iteration_s"] < 1.3 * max(med["perf/data_s"] + med["perf/h2d_s"], med["perf/step_s"]), med
    assert med["perf/images_per_s"] == pytest.approx(16 / med["perf/iteration_s"], rel=0.5)
    tb = list((tmp_path / "overlap" / "tensorboard").glob("events.out.tfevents.*"))
    assert tb and b"perf/step_s" in tb[0].read_bytes() and b"perf/data_wait_s" in tb[0].read_bytes()


def test_nonfinite_stop_acts_one_step_late_and_saves_nothing_bad(tmp_path):
    """NaN images at iteration 4, checkpoints every 2: step 5 is already dispatched when step 4's loss is read;
    the run stops naming iteration 4, keeps checkpoint 4 (the state before the NaN step) as the last one, and
    never logs step 5's row or saves its state."""
    result = loop.train(_tiny(**{"steps": 8, "checkpoint.every": 2, "runtime.inject_nan_at_step": 4}),
                        tmp_path / "nan")
    assert result.status == "nonfinite"
    assert "non-finite loss (nan) at iteration 4" in result.message and "checkpoint is step 4" in result.message
    assert committed_steps(tmp_path / "nan" / "checkpoints") == [2, 4]
    rows = read_metrics(tmp_path / "nan")
    assert sorted(rows) == [0, 1, 2, 3, 4] and not np.isfinite(rows[4]["loss/total"])
