"""gpfm-train under pod-scale faults (issue 13), each test failing without its handling: checkpoint retention, a
full disk during a save (a real size-capped tmpfs when this machine lets us mount one, else a write that raises
ENOSPC), a blocked data read and a hung step (deadlines), a peer process killed in a two-process run (between
checkpoints and during an async checkpoint write), a short soak (SIGKILL / SIGTERM at random points, bitwise
resume), and gpfm-extract's HDF5 output on a full disk."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers_train import FAST_COMPILE, PAIR_REFERENCE, PAIR_REFERENCE_STEPS, REPO, finish, run_cli
from helpers_train import start_two_processes, tiny
from gpfm_jax.train import loop
from gpfm_jax.train.faults import committed_steps
from gpfm_jax.train.metrics_writer import read_metrics

sys.path.insert(0, str(REPO / "tools"))
import soak  # noqa: E402

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it




def _tiny(**changes):
    """The tiny run config on one device of this process."""
    return tiny(one_device=True, **changes)


def _phases(workdir, phases: str, *args: str, cache, timeout=300):
    """tests/helpers_train.py in a subprocess (1 device): `args` are key=value config overrides or inject.*."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
               TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "tests" / "helpers_train.py"), str(workdir), phases,
           f"runtime.compile_cache_dir={cache}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def _state(workdir: Path, step: int) -> dict:
    return soak.read_state(Path(workdir), step)


def _assert_states_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _report_line(out: str, prefix: str) -> str:
    """The report line that starts with `prefix`, from a log where stdout and stderr share one pipe: orbax's and
    asyncio's threads write multi-KiB tracebacks at the same moment, and a pipe write over PIPE_BUF (4 KiB) can be
    split by the kernel, so foreign bytes may precede the report on its line (it is written whole, in one write)."""
    for x in out.splitlines():
        if prefix in x:
            return x[x.index(prefix):]
    raise AssertionError(f"no line with {prefix!r} in the output; its end:\n{out[-3000:]}")


# ---------------------------------------------------------------------------------------------------------------
# Retention


def test_retention_keeps_the_last_k_and_the_periodic_checkpoints(tmp_path, cache_dir):
    """keep=2, keep_period=3, a save every iteration for 7: steps 6, 7 (the last two) and 3 (a multiple of 3)
    stay. (Before the fix orbax got neither option and kept all seven.)"""
    cfg = _tiny(**{"steps": 7, "checkpoint.every": 1, "checkpoint.keep": 2, "checkpoint.keep_period": 3})
    result = loop.train(cfg, tmp_path / "keep")
    assert result.status == "done"
    assert committed_steps(tmp_path / "keep" / "checkpoints") == [3, 6, 7]


# ---------------------------------------------------------------------------------------------------------------
# Full disk


def _can_mount_tmpfs(tmp_path) -> bool:
    """Root with mount rights (GPFM_TEST_NO_TMPFS=1 forces the injected-ENOSPC variant)."""
    if os.environ.get("GPFM_TEST_NO_TMPFS") == "1":
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


@contextlib.contextmanager
def _tmpfs(path: Path, size_kib: int):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The tiny config uninterrupted to 8 iterations, checkpoints every 2 (the CLI, one device)."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_cli(workdir, "--config.steps=8", "--config.checkpoint.every=2", "--config.checkpoint.keep=5",
                     f"--config.runtime.compile_cache_dir={cache_dir}")
    assert result.returncode == 0, result.stdout[-3000:]
    return workdir


def test_full_disk_during_a_save_stops_cleanly_and_keeps_earlier_checkpoints(tmp_path, cache_dir, reference):
    """The checkpoint folder on a 2.6 MB tmpfs (one checkpoint of the tiny run is ~1 MB): saves 2 and 4 fit, save 6
    (async) runs out of space. gpfm-train notices within an iteration or two (at the latest at the next save),
    reports the path and the free space, exits 3 well before its last iteration, leaves no temporary folder, and
    checkpoint 4 restores bitwise equal to the uninterrupted run's. Without a mountable tmpfs the same failure is
    injected as a write raising ENOSPC."""
    workdir = tmp_path / "full"
    if _can_mount_tmpfs(tmp_path):
        with _tmpfs(workdir / "checkpoints", 2600):
            result = run_cli(workdir, "--config.steps=12", "--config.checkpoint.every=2", "--config.checkpoint.keep=5",
                             f"--config.runtime.compile_cache_dir={cache_dir}")
            kept = sorted(p.name for p in (workdir / "checkpoints").iterdir())
            state4 = _state(workdir, 4)
    else:
        result = _phases(workdir, "12", "checkpoint.every=2", "checkpoint.keep=5", "inject.enospc_at_save=2",
                         cache=cache_dir)
        kept = sorted(p.name for p in (workdir / "checkpoints").iterdir())
        state4 = _state(workdir, 4)
    out = result.stdout
    assert result.returncode == 3, out[-3000:]
    line = _report_line(out, "gpfm-train: checkpoint save of step 6")
    assert re.search(r"failed: no space left on the device; [\d.]+ (B|KiB|MiB) free of [\d.]+ (KiB|MiB|GiB)", line)
    assert f"to {workdir / 'checkpoints' / '6'}" in line and "earlier checkpoints intact: steps 2, 4" in line
    assert kept == ["2", "4", "encoder.json"]  # no half-written step 6, no temporary folder
    _assert_states_equal(state4, _state(reference, 4))
    assert 6 <= max(read_metrics(workdir)) <= 8  # training stopped once the failed save was known


def test_full_disk_in_retry_mode_saves_again_at_the_next_interval(tmp_path, cache_dir, reference):
    """on_save_error=retry: save 4 fails (ENOSPC), training goes on, save 6 and the final 8 succeed, and the run
    ends bitwise equal to the uninterrupted one (a failed save does not touch the training state)."""
    workdir = tmp_path / "retry"
    result = _phases(workdir, "8", "checkpoint.every=2", "checkpoint.keep=5", "checkpoint.on_save_error=retry",
                     "inject.enospc_at_save=1", cache=cache_dir)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "checkpoint save of step 4" in result.stdout and "no space left on the device" in result.stdout
    assert "training goes on and saves again at the next interval" in result.stdout
    assert committed_steps(workdir / "checkpoints") == [2, 6, 8]
    _assert_states_equal(_state(workdir, 8), _state(reference, 8))


# ---------------------------------------------------------------------------------------------------------------
# Deadlines


@pytest.mark.serial  # races a deadline / measures time: alone under xdist (conftest.py)
def test_a_blocked_data_read_is_reported_and_the_run_stops(tmp_path, cache_dir):
    """The data source never returns batch 5 (counted from 0): with deadline.data_s=3 the process reports the
    iteration, process and phase and the last committed checkpoint within a few seconds, and exits 4 (the blocked
    reader thread does not keep it alive)."""
    workdir = tmp_path / "stalled"
    t0 = time.perf_counter()
    result = _phases(workdir, "8", "checkpoint.every=2", "deadline.data_s=3", "deadline.poll_s=0.25",
                     "inject.block_data_at=5", cache=cache_dir, timeout=240)
    wall = time.perf_counter() - t0
    out = result.stdout
    assert result.returncode == 4, out[-3000:]
    line = _report_line(out, "gpfm-train: stalled:")
    assert re.search(r"stalled: process 0 of 1, iteration 5, phase 'data' has run 3\.\d s, past its deadline "
                     r"config\.deadline\.data_s=3; the last committed checkpoint is step 4 in ", line), line
    assert committed_steps(workdir / "checkpoints") == [2, 4]
    print(f"blocked data read: exit 4 after {wall:.1f} s in all (start-up and compile included)")


@pytest.mark.serial  # races a deadline / measures time: alone under xdist (conftest.py)
def test_a_hung_step_is_reported_and_the_run_stops(tmp_path, cache_dir):
    """From iteration 3 on a step never finishes (a host callback inside it waits forever): with deadline.step_s=2
    the process reports iteration 3 in phase 'step' and exits 4, whether the main thread is left waiting for the
    step's results or is stuck inside the dispatch (then the watchdog exits after deadline.grace_s)."""
    workdir = tmp_path / "hung"
    t0 = time.perf_counter()
    result = _phases(workdir, "8", "checkpoint.every=2", "deadline.step_s=2", "deadline.poll_s=0.25",
                     "deadline.grace_s=5", "inject.slow_step_s=3600", "inject.slow_step_from=3", cache=cache_dir,
                     timeout=240)
    wall = time.perf_counter() - t0
    assert result.returncode == 4, result.stdout[-3000:]
    line = _report_line(result.stdout, "gpfm-train: stalled:")
    assert re.search(r"stalled: process 0 of 1, iteration [34], phase 'step' has run 2\.\d s, past its deadline "
                     r"config\.deadline\.step_s=2; the last committed checkpoint is step 2", line), line
    assert committed_steps(workdir / "checkpoints") == [2]
    print(f"hung step: exit 4 after {wall:.1f} s in all (start-up and compile included)")


# ---------------------------------------------------------------------------------------------------------------
# Dead peer (two processes on localhost, gloo)


def _start_pair(workdir: Path, steps: int, cache: Path, *extra: str):
    """The tiny config on two processes (helpers_train.start_two_processes) with a 3 s peer deadline."""
    return start_two_processes(workdir, str(steps), cache, *PAIR_REFERENCE, "runtime.heartbeat_timeout_s=20",
                               "deadline.peer_s=3", "deadline.poll_s=0.25", *extra)


def _story(out: str) -> str:
    """A failing survivor's output for an assertion message: its Python-level lines (reports, tracebacks, logs),
    not the C++ stack trace that JAX's abort appends."""
    return "\n".join(x for x in out.splitlines() if not x.lstrip().startswith(("@", "E1", "F1", "W1", "I1", "***")))[-4000:]


def _kill_when(procs, victim: int, ready) -> tuple[float, str, int]:
    """SIGKILLs process `victim` once `ready()` holds; returns (seconds from the kill to the survivor's exit, the
    survivor's output, its exit status)."""
    deadline = time.time() + 300
    while not ready():
        assert all(p.poll() is None for p in procs), finish(procs)[0][-3000:]
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.005)
    procs[victim].kill()
    t_kill = time.perf_counter()
    survivor = procs[1 - victim]
    survivor.wait(timeout=120)
    elapsed = time.perf_counter() - t_kill
    out = survivor.communicate(timeout=60)[0]  # also waits for its death-notice watcher
    procs[victim].wait()
    return elapsed, out, survivor.returncode


def test_a_killed_peer_is_reported_and_the_rerun_resumes_bitwise(tmp_path, cache_dir, alone, pair_reference):
    """Two processes (4 CPU devices each) train together. Process 1 is SIGKILLed while checkpoint 4 is being
    written (async): process 0 exits with status 5 within seconds (deadline.peer_s=3), naming process 1 and the last
    committed checkpoint. After the rerun restored it, the coordinator (process 0) is SIGKILLed between checkpoints:
    JAX aborts process 1 at once (no Python code runs), and its death-notice watcher prints the line with the last
    committed checkpoint. Rerunning both processes then resumes and ends bitwise equal to an uninterrupted run. The
    two runs that are killed run alone (conftest.py: `alone`): their reports race seconds-long deadlines."""
    steps, reference = PAIR_REFERENCE_STEPS, pair_reference.workdir

    workdir = tmp_path / "killed"
    ckpts = workdir / "checkpoints"
    figures = []
    with alone():
        # 1: process 1, during the async write of checkpoint 4
        procs = _start_pair(workdir, steps, cache_dir, "runtime.step_sleep_s=0.2")
        writing = lambda: ckpts.is_dir() and any(p.name.startswith("4.orbax-checkpoint-tmp") for p in ckpts.iterdir())
        elapsed, out, status = _kill_when(procs, 1, writing)
        assert status == 5, _story(out)
        committed = committed_steps(ckpts)
        line = _report_line(out, "gpfm-train: lost process 1")
        assert f"the last committed checkpoint is step {committed[-1]} in {ckpts}" in line, (line, committed)
        assert "rerun the same command on every host" in line and elapsed < 15, (elapsed, line)
        assert "ended without a clean exit" not in out  # its own report came first
        figures.append(f"process 1 during checkpoint 4's write: process 0 exit 5 after {elapsed:.1f} s, committed "
                       f"{committed}")

        # 2: the coordinator, between checkpoints, after the rerun restored and went past the next checkpoint
        procs = _start_pair(workdir, steps, cache_dir, "runtime.step_sleep_s=0.2")
        past = committed[-1] + 3
        elapsed, out, status = _kill_when(procs, 0, lambda: max(read_metrics(workdir), default=-1) >= past)
        assert status != 0, out[-3000:]
        committed = committed_steps(ckpts)
        line = _report_line(out, "gpfm-train: process 1 of 2 ended without a clean exit")
        assert f"the last committed checkpoint is step {committed[-1]} in {ckpts}" in line, (line, committed)
        assert elapsed < 15, (elapsed, line)
        figures.append(f"process 0 (coordinator) at iteration >= {past}: process 1 aborted by JAX (status {status}) "
                       f"after {elapsed:.1f} s, committed {committed}")

    outs = finish(_start_pair(workdir, steps, cache_dir))
    assert f"restored step {committed[-1]}" in outs[0] and "done: iterations" in outs[0], outs[0][-3000:]
    assert sorted(read_metrics(workdir)) == list(range(steps))
    _assert_states_equal(_state(workdir, steps), _state(reference, steps))
    for row_a, row_b in zip(*(sorted(read_metrics(w).items()) for w in (workdir, reference))):
        assert row_a[1]["loss/total"] == row_b[1]["loss/total"], (row_a[0], row_a[1]["loss/total"])
    print("killed peer:", "; ".join(figures))


@pytest.mark.serial  # races a deadline / measures time: alone under xdist (conftest.py)
def test_a_failed_collective_waits_for_the_heartbeat_to_name_the_lost_peer(monkeypatch):
    """The survivor's step fails (gloo: "Connection reset by peer") before the heartbeat calls the peer lost. In
    the worst case that takes peer_s + one heartbeat interval (the last beat was seen up to an interval after the
    peer wrote it) + one watchdog poll after the error; the loop must wait that long, or it re-raises and JAX's
    shutdown barrier aborts the process with a C++ trace (seen under the full suite's load). A genuine error is
    still re-raised after a bounded wait."""
    import threading
    from types import SimpleNamespace

    from gpfm_jax.train import faults
    from gpfm_jax.train.config_schema import DeadlineConfig

    d = DeadlineConfig(peer_s=0.6, poll_s=0.05)
    watchdog = SimpleNamespace(expired=None, heartbeat=SimpleNamespace(interval_s=0.12))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    lag = d.peer_s + watchdog.heartbeat.interval_s + d.poll_s
    timer = threading.Timer(lag, lambda: setattr(watchdog, "expired", faults.PeerLost("lost process 1")))
    timer.start()
    try:
        lost = loop._peer_loss_behind(RuntimeError("Connection reset by peer"), watchdog, d)
    finally:
        timer.cancel()
    assert isinstance(lost, faults.PeerLost) and str(lost) == "lost process 1"

    watchdog.expired = None
    start = time.monotonic()
    assert loop._peer_loss_behind(RuntimeError("a genuine error"), watchdog, d) is None
    assert lag < time.monotonic() - start < lag + d.poll_s + 2.5


def test_the_peer_heartbeat_thread_is_stopped_and_joined_before_exit():
    """At interpreter exit a daemon heartbeat thread still inside a client call is ended by pthread_exit, and the C++
    code it unwinds through aborts the process ("FATAL: exception not rethrown", seen once in the two-process
    test): stop() must wait for the thread, and runtime.setup registers it to run at exit."""
    from gpfm_jax.train import faults, runtime

    class SlowClient:
        def key_value_set(self, key, value, allow_overwrite=False):
            time.sleep(0.3)  # a call in flight when the exit comes

        def key_value_try_get(self, key):
            return "1"

    heartbeat = faults.PeerHeartbeat(SlowClient(), 0, 2, interval_s=0.01)
    time.sleep(0.05)
    heartbeat.stop()
    assert not heartbeat._thread.is_alive()
    assert "atexit.register(_heartbeat.stop)" in inspect.getsource(runtime.setup)


# ---------------------------------------------------------------------------------------------------------------
# Soak (short: the full one is `python tools/soak.py --seed 0`)


def test_short_soak_sigkill_and_sigterm_resume_bitwise(tmp_path, cache_dir, reference, alone):
    """tools/soak.py at small size against the same uninterrupted 8-iteration run: SIGKILL twice (one aimed at a
    checkpoint write), SIGTERM once; every loss and the final state bitwise equal. The runs that are killed run
    alone (conftest.py: `alone`): they race the run's progress; the final resumes share the machine."""
    lines = []
    kills, problems = soak.soak(3, 8, 2, 2, "KILL", tmp_path, str(REPO / "tests" / "helpers_train.py"), 0.5,
                                cache_dir, reference=reference, log=lines.append, kill_phase=alone,
                                xla_flags=FAST_COMPILE)
    assert not problems, problems
    assert len(kills) == 2 and all(k.exit_status == -9 for k in kills), lines
    kills, problems = soak.soak(3, 8, 2, 1, "TERM", tmp_path, str(REPO / "tests" / "helpers_train.py"), 0.0,
                                cache_dir, reference=reference, log=lines.append, kill_phase=alone,
                                xla_flags=FAST_COMPILE)
    assert not problems, problems
    assert len(kills) == 1 and kills[0].exit_status == 0, lines
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# gpfm-extract on a full disk


def test_extract_on_a_full_disk_leaves_finished_slides_and_no_partial_file(tmp_path, capsys):
    """Three slides to an output folder that fills up during the second: gpfm-extract exits 3 with the file and the
    free space named; the first slide's file is complete (same rows as with room to spare), no .partial file is
    left. Without a mountable tmpfs, the HDF5 flush raises ENOSPC instead."""
    import test_extract as tx
    from gpfm_jax.extract import cli
    from gpfm_jax.convert.bundle import preprocessing, save_bundle
    from gpfm_jax.extract.h5out import reserve_bytes

    meta = {"encoder": "vit", "vit": tx.CFG.to_dict(), "outputs": {"cls": tx.CFG.embed_dim, "patch": tx.CFG.embed_dim},
            "preprocessing": preprocessing(tx.SIZE), "provenance": {"source": "random test weights"}}
    save_bundle(tmp_path / "enc", tx._random_params(tx.CFG), meta)
    slides = tx._slide_folder(tmp_path / "slides", ["a.svs", "b.svs", "c.svs"])
    args = ["--encoder", str(tmp_path / "enc"), "--input", str(slides), "--tile-size", "256", "--batch-size", "4",
            "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "roomy")]) == 0
    one = (tmp_path / "roomy" / "a.h5").stat().st_size
    reserve = reserve_bytes(25, 4 * tx.CFG.embed_dim + 16)  # what a 25-tile slide sets aside before writing
    out = tmp_path / "full"
    if _can_mount_tmpfs(tmp_path):
        with _tmpfs(out, (reserve + one // 2) // 1024):  # a fits; after it, b's reservation does not
            status = cli.main([*args, "--out", str(out)])
            names = sorted(p.name for p in out.iterdir())
            a = tx._read_h5(out / "a.h5") if (out / "a.h5").exists() else None
    else:  # the reservation of b's file fails as on a full disk
        real = os.posix_fallocate

        def fallocate(fd, offset, length):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".b.h5.partial"):
                raise OSError(28, "No space left on device")
            return real(fd, offset, length)

        os.posix_fallocate = fallocate
        try:
            status = cli.main([*args, "--out", str(out)])
        finally:
            os.posix_fallocate = real
        names = sorted(p.name for p in out.iterdir())
        a = tx._read_h5(out / "a.h5")
    assert status == 3
    err = capsys.readouterr().err
    assert re.search(rf"gpfm-extract: error: writing {re.escape(str(out / 'b.h5'))} failed: no space left on the "
                     r"device; [\d.]+ (B|KiB|MiB|GiB|TiB) free on the filesystem of ", err), err[-2000:]
    assert names == ["a.h5"]  # finished slide kept, nothing half-written
    roomy = tx._read_h5(tmp_path / "roomy" / "a.h5")
    np.testing.assert_array_equal(a["coords"], roomy["coords"])
    np.testing.assert_array_equal(a["features"], roomy["features"])
