"""Soak test of gpfm-train's restarts: a run killed again and again ends bitwise equal to an uninterrupted one.

Runs the uninterrupted reference, then the same run killed with SIGKILL (or stopped with SIGTERM) at `--kills` random
points and resumed each time (the same command), some of the kills while a checkpoint is being written; then
compares every logged loss and the final train state array by array, bitwise. Prints what it did; exit status 0 if
everything matched.

    python tools/soak.py --seed 0 [--steps 300] [--every 10] [--kills 5] [--signal KILL|TERM|both] [--workdir DIR]
                         [--config tests/helpers_train.py] [--during-write 0.4] [--xla-flags FLAGS]

Each kill point is drawn from the seed: an iteration after the last committed checkpoint, or (with probability
`--during-write`) the next moment a checkpoint's temporary folder exists. SIGKILL is the pre-emption without notice
(OOM killer, hardware); SIGTERM is the polite one (SLURM / TPU maintenance): the run saves and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU soak: this process only reads checkpoints back
REPO = Path(__file__).resolve().parents[1]
TMP_MARK = ".orbax-checkpoint-tmp"
# What the soak's CPU processes compile with by default: LLVM without its expensive passes (many short runs), as
# the test suite's runs (tests/xla_flags.py, the flags' one home; like --config, the soak's defaults live in tests/).
sys.path.insert(0, str(REPO / "tests"))
from xla_flags import CHEAP_LLVM  # noqa: E402


@dataclasses.dataclass
class Kill:
    signal: str
    target: str  # "iteration N" or "checkpoint write"
    at_iteration: int | None  # the last logged iteration when the signal was sent
    committed: list[int]  # committed checkpoints at that moment
    writing: list[str]  # checkpoint folders being written at that moment
    exit_status: int | None
    launch_s: float = 0.0  # from the launch to the signal
    exit_s: float = 0.0  # from the signal to the exit


def launch(config: str, workdir: Path, steps: int, every: int, cache: Path, extra: list[str], quiet: bool = True,
           xla_flags: str = CHEAP_LLVM):
    cmd = [sys.executable, "-m", "gpfm_jax.train.main", "--config", config, "--workdir", str(workdir),
           f"--config.steps={steps}", f"--config.checkpoint.every={every}", "--config.checkpoint.keep=3",
           "--config.checkpoint.keep_period=0", f"--config.runtime.compile_cache_dir={cache}",
           "--config.log.progress=False", *extra]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",  # one CPU device
               XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {xla_flags}")
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out)


def last_iteration(workdir: Path) -> int | None:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") is None:
            last = int(row["step"])
    return last


def checkpoint_folders(workdir: Path, since: float = 0.0) -> tuple[list[int], list[str]]:
    """(committed steps, temporary folders of saves in progress modified after `since`)."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return [], []
    committed, writing = [], []
    for p in folder.iterdir():
        try:
            if p.name.isdigit():
                committed.append(int(p.name))
            elif TMP_MARK in p.name and p.stat().st_mtime >= since:  # not one left by an earlier kill
                writing.append(p.name)
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
    return sorted(committed), sorted(writing)


def kill_once(proc: subprocess.Popen, workdir: Path, sig: str, target_iteration: int | None,
              timeout_s: float = 600) -> Kill | None:
    """Waits for the kill point, sends the signal, waits for the exit. None: the run finished first."""
    started = time.time()
    deadline = started + timeout_s
    while proc.poll() is None and time.time() < deadline:
        committed, writing = checkpoint_folders(workdir, since=started)
        it = last_iteration(workdir)
        hit = bool(writing) if target_iteration is None else (it is not None and it >= target_iteration)
        if hit:
            t_signal = time.time()
            proc.send_signal(signal.SIGKILL if sig == "KILL" else signal.SIGTERM)
            status = proc.wait(timeout=300)
            return Kill(sig, "checkpoint write" if target_iteration is None else f"iteration {target_iteration}", it,
                        committed, writing, status, t_signal - started, time.time() - t_signal)
        time.sleep(0.002)
    if proc.poll() is None:
        proc.kill()
        raise TimeoutError(f"no kill point within {timeout_s} s")
    return None


def read_state(workdir: Path, step: int):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
            fallback_sharding=one)))
    flat = jax.tree_util.tree_flatten_with_path(restored["state"])[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def losses(workdir: Path) -> dict[int, float]:
    sys.path.insert(0, str(REPO))
    from gpfm_jax.train.metrics_writer import read_metrics

    return {s: r["loss/total"] for s, r in read_metrics(workdir).items()}


def compare(reference: Path, faulted: Path, steps: int) -> list[str]:
    """Differences between the two runs (empty: bitwise equal)."""
    import numpy as np

    problems = []
    a, b = losses(reference), losses(faulted)
    if sorted(a) != list(range(steps)) or sorted(b) != list(range(steps)):
        problems.append(f"logged iterations differ: {len(a)} vs {len(b)} of {steps}")
    problems += [f"loss at iteration {s}: {a[s]!r} vs {b.get(s)!r}" for s in sorted(a) if b.get(s) != a[s]]
    sa, sb = read_state(reference, steps), read_state(faulted, steps)
    if sorted(sa) != sorted(sb):
        problems.append("the state trees differ")
    problems += [f"state {k} differs" for k in sorted(sa) if k in sb and not np.array_equal(sa[k], sb[k])]
    return problems


def soak(seed: int, steps: int, every: int, kills: int, sig: str, workdir: Path, config: str,
         during_write: float, cache: Path, reference: Path | None = None, log=print,
         kill_phase=contextlib.nullcontext, xla_flags: str = CHEAP_LLVM) -> tuple[list[Kill], list[str]]:
    """Kills a run `kills` times with `sig` and resumes it; returns the kills and the differences to `reference`
    (an uninterrupted run to `steps`, made here if None). The kills run inside `kill_phase()` (the test suite runs
    them alone: they race the run's progress), the reference and the final resume outside it. Every run is compiled
    with `xla_flags` (a given `reference` must have been too: XLA's flags can change the last bit)."""
    rng = random.Random(f"{seed}-{sig}")
    if reference is None:
        reference = workdir / "reference"
        t0 = time.time()
        status = launch(config, reference, steps, every, cache, [], xla_flags=xla_flags).wait()
        log(f"reference: {steps} iterations uninterrupted, exit {status}, {time.time() - t0:.0f} s")
    faulted = workdir / f"killed_{sig}"
    done: list[Kill] = []
    extra = ["--config.runtime.step_sleep_s=0.02"]
    with kill_phase():
        while len(done) < kills:
            committed, _ = checkpoint_folders(faulted)
            start = (last_iteration(faulted) or 0) if sig == "TERM" else (committed[-1] if committed else 0)
            if start >= steps - 2:
                log(f"  run reached iteration {start}: fewer kill points left than asked ({len(done)} done)")
                break
            write = rng.random() < during_write
            span = max(1, (steps - 2 - start) // (kills - len(done)))  # leave room for the kills still to come
            target = None if write else start + 1 + rng.randrange(span)
            proc = launch(config, faulted, steps, every, cache, extra, xla_flags=xla_flags)
            kill = kill_once(proc, faulted, sig, target)
            if kill is None:
                log("  the run finished before the kill point")
                break
            done.append(kill)
            log(f"  kill {len(done)}: SIG{sig} at {kill.target}: last logged iteration {kill.at_iteration}, committed "
                f"checkpoints {kill.committed}, being written {kill.writing or 'none'}, exit status {kill.exit_status} "
                f"({kill.launch_s:.0f} s after the launch, exited {kill.exit_s:.1f} s after the signal)")
    status = launch(config, faulted, steps, every, cache, [], xla_flags=xla_flags).wait()
    committed, writing = checkpoint_folders(faulted)
    log(f"  final resume: exit {status}; checkpoints {committed}; leftover temporary folders {writing or 'none'}")
    problems = compare(reference, faulted, steps)
    return done, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=10, help="checkpoint interval (iterations)")
    p.add_argument("--kills", type=int, default=5, help="kills per signal")
    p.add_argument("--signal", choices=("KILL", "TERM", "both"), default="both")
    p.add_argument("--during-write", type=float, default=0.4, help="share of kills aimed at a checkpoint write")
    p.add_argument("--config", default=str(REPO / "tests" / "helpers_train.py"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--xla-flags", default=CHEAP_LLVM, help="XLA_FLAGS of every run (after the device count)")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpfm_soak_"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "xla_cache"
    print(f"soak: seed {args.seed}, {args.steps} iterations, checkpoint every {args.every}, {args.kills} kills per "
          f"signal, config {args.config}, workdir {workdir}")
    t0 = time.time()
    reference = workdir / "reference"
    launch(args.config, reference, args.steps, args.every, cache, [], xla_flags=args.xla_flags).wait()
    print(f"reference: {args.steps} iterations uninterrupted in {time.time() - t0:.0f} s")
    failed = False
    for sig in (("KILL", "TERM") if args.signal == "both" else (args.signal,)):
        t1 = time.time()
        print(f"SIG{sig}:")
        kills, problems = soak(args.seed, args.steps, args.every, args.kills, sig, workdir, args.config,
                               args.during_write, cache, reference, xla_flags=args.xla_flags)
        verdict = "bitwise equal to the uninterrupted run" if not problems else "DIFFERENT: " + "; ".join(problems[:5])
        print(f"SIG{sig}: {len(kills)} kills ({sum(k.target == 'checkpoint write' for k in kills)} during a "
              f"checkpoint write), {time.time() - t1:.0f} s; final state and every loss: {verdict}")
        failed |= bool(problems) or len(kills) < args.kills
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
