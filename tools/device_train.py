"""The end-to-end figure (issue 19): `gpfm-train` itself, with the data pipeline, on this machine's devices.

Used by `tools/device_check.py --train`. The step section times the step alone on device-resident random data; this
runs the real command (`python -m gpfm_jax.train.main`) in a subprocess: tiles read from the bundled sample slide
(tests/data/cmu_small_region.svs, data.source="slides") through grain with worker processes, crops and masks made on
the host, the official model (configs/gpfm_vitl14.py, the recipe's remat, 96 images per device) and the expert
teachers at their real architectures, with random weights written as encoder bundles (no real weights needed). With
--tiny: configs/demo.py shrunk, stand-in teachers, a few iterations (the CPU test).

Every figure comes from the run's own per-iteration time breakdown (metrics.jsonl, docs/training.md "Where the time
goes"), over the steady iterations (the first ones compile and drain the prefetch queue filled meanwhile):
end-to-end images/s (global batch / loop period), step-only images/s (global batch / device step time), the share
of the loop period the device had no step to run (1 - step / period: it waited for data or the host), the share the
loop spent waiting for a batch, and the host cores the trainer and its grain workers used (process-tree CPU time
over the same steady iterations, sampled with psutil; and over the whole run, from getrusage).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "tests" / "data" / "cmu_small_region.svs"
TEACHER_NAMES = ("uni", "phikon", "conch")


def random_bundles(out_dir: Path, names=TEACHER_NAMES, seed: int = 0) -> dict[str, Path]:
    """Encoder bundles of the expert teachers at their registry architectures with random weights (what
    tools/port_teacher.py writes from the real checkpoints, minus the weights): gpfm-train loads them as it loads
    the real ones, so the step has the real teachers' shapes and costs."""
    from gpfm_jax.convert.bundle import is_bundle, save_bundle
    from gpfm_jax.convert.teacher_port import teacher_meta
    from gpfm_jax.models.teachers import TEACHERS, build_teacher

    paths = {}
    for i, name in enumerate(names):
        path = out_dir / name
        if not is_bundle(path):
            teacher = build_teacher(TEACHERS[name], scan_layers=False)
            meta = teacher_meta(TEACHERS[name], {"source": "random weights (tools/device_train.py)", "seed": seed + i})
            save_bundle(path, teacher.init_params(seed + i), meta)
        paths[name] = path
    return paths


def overrides(tiny: bool, num_devices: int, per_device_batch: int, iters: int, workers: int,
              bundles: dict[str, Path] | None) -> tuple[Path, list[str]]:
    """(config file, --config.* flags) of the run: the slide source, the batch, the mesh, no probe / TensorBoard /
    progress bar, one checkpoint at the end."""
    flags = {
        "steps": iters, "data.source": "slides", "data.path": str(SLIDE), "data.worker_count": workers,
        "data.global_batch_size": per_device_batch * num_devices, "mesh.fsdp": math.gcd(8, num_devices),
        "mesh.num_devices": num_devices,
        "checkpoint.every": iters, "checkpoint.keep": 1, "checkpoint.keep_period": 0,
        "log.progress": False, "log.tensorboard": False, "log.sanity_every": 0, "probe.enabled": False,
    }
    if tiny:
        config = REPO / "configs" / "demo.py"
        flags.update({"model.vit.depth": 1, "model.vit.embed_dim": 32, "model.vit.num_heads": 2,
                      "model.heads.out_dim": 64, "model.heads.hidden_dim": 32, "model.heads.bottleneck_dim": 16,
                      "model.heads.distill_bottleneck_dim": 16, "standin.embed_dim": 16, "standin.depth": 1,
                      "standin.num_heads": 2, "standin.pooler_dim": 16, "data.multicrop.num_local_crops": 2,
                      "data.prefetch_records": 8, "data.tile_workers": 1})
    else:
        config = REPO / "configs" / "gpfm_vitl14.py"
        for name, path in (bundles or {}).items():
            flags[f"teachers.{name}"] = str(path)
    return config, [f"--config.{k}={v}" for k, v in flags.items()]


class TreeCpu:
    """CPU seconds of a process and its descendants (alive ones, plus the reaped ones its children_* times hold),
    sampled when the run's metrics log reaches given row counts."""

    def __init__(self, pid: int, metrics: Path, marks: tuple[int, int]):
        self.pid, self.metrics, self.marks = pid, metrics, marks
        self.samples: dict[int, tuple[float, float]] = {}  # mark -> (wall, cpu)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cpu(self) -> float:
        import psutil

        root = psutil.Process(self.pid)
        procs = [root, *root.children(recursive=True)]
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system + (t.children_user + t.children_system if p is root else 0.0)
            except psutil.Error:  # a worker that just exited: its time moves to its parent's children_*
                pass
        return total

    def _rows(self) -> int:
        try:
            return self.metrics.read_bytes().count(b'"perf/step_s"')  # iteration rows, not messages
        except OSError:
            return 0

    def _run(self) -> None:
        pending = sorted(self.marks)
        while pending and not self._stop.is_set():
            rows = self._rows()
            while pending and rows >= pending[0]:
                try:
                    self.samples[pending.pop(0)] = (time.perf_counter(), self.cpu())
                except Exception:  # noqa: BLE001 - the process ended: no sample
                    return
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(workdir: Path, tiny: bool, num_devices: int, per_device_batch: int, iters: int, workers: int,
        skip: int, bundles: dict[str, Path] | None = None, timeout_s: float = 1800) -> dict[str, Any]:
    """gpfm-train in a subprocess; the figures from its metrics.jsonl (rows skip.. iters-1)."""
    from gpfm_jax.train.metrics_writer import METRICS_FILE

    config, flags = overrides(tiny, num_devices, per_device_batch, iters, workers, bundles)
    cmd = [sys.executable, "-m", "gpfm_jax.train.main", "--config", str(config), "--workdir", str(workdir), *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.9"  # configs/gpfm_vitl14.py: the plan counts 90% of HBM
    metrics = workdir / METRICS_FILE
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeCpu(proc.pid, metrics, (skip, iters))  # iteration skip - 1 logged .. the last one logged
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError(f"gpfm-train ran past {timeout_s} s; output tail: {out[-2000:]}")
    finally:
        sampler.stop()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"gpfm-train exited {proc.returncode}: {out[-3000:]}")
    figures = breakdown(workdir, skip)
    if figures["iterations"] != iters:
        raise RuntimeError(f"metrics.jsonl has {figures['iterations']} iterations, the run was for {iters}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    steady = None
    if len(sampler.samples) == 2:
        (w0, c0), (w1, c1) = (sampler.samples[m] for m in sorted(sampler.samples))
        steady = (c1 - c0) / (w1 - w0) if w1 > w0 else None
    batch = per_device_batch * num_devices
    return {"command": " ".join(cmd[1:]), "global_batch": batch, "devices": num_devices,
            "end_to_end_img_per_s": batch / figures["iteration_s"], "step_only_img_per_s": batch / figures["step_s"],
            "run_wall_s": wall, "host_cores_whole_run": cpu / wall,
            "host_cores_steady": steady, "host_cores_available": os.cpu_count(), "grain_workers": workers,
            **figures, "log_tail": out[-600:]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """tools/device_check.py's options for the train section."""
    parser.add_argument("--train-iters", type=int, default=None, help="default 50; tiny: 10")
    parser.add_argument("--train-workers", type=int, default=None, help="grain workers; default cores - 2; tiny: 1")
    parser.add_argument("--train-dir", default=None, help="scratch for the bundles and the run (default: a temp dir)")
    parser.add_argument("--train-timeout", type=float, default=900.0, help="seconds the gpfm-train run may take")


def section(out_dir: Path, args: argparse.Namespace, num_devices: int) -> dict[str, Any]:
    """device_check's train section: random teacher bundles (not with --tiny), the run, its metrics.jsonl copied
    beside the JSON as train_metrics.jsonl. Bundles and checkpoints (GBs) go to --train-dir (default a temp dir)."""
    scratch_dir = Path(args.train_dir or tempfile.mkdtemp(prefix="device_train_"))
    try:
        return _section(out_dir, args, num_devices, scratch_dir)
    finally:
        if not args.train_dir:  # GBs of random bundles and a ViT-L checkpoint on a device with a small disk
            shutil.rmtree(scratch_dir, ignore_errors=True)


def _section(out_dir: Path, args: argparse.Namespace, num_devices: int, scratch_dir: Path) -> dict[str, Any]:
    tiny, per_device_batch, timeout_s = args.tiny, args.per_device_batch, args.train_timeout
    iters = args.train_iters or (10 if tiny else 50)
    workers = args.train_workers if args.train_workers is not None else (
        1 if tiny else max(1, (os.cpu_count() or 4) - 2))
    t0 = time.perf_counter()
    bundles = None if tiny else random_bundles(scratch_dir / "random_teachers")
    bundles_s = time.perf_counter() - t0
    workdir = scratch_dir / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    result = run(workdir, tiny, num_devices, per_device_batch or (2 if tiny else 96), iters, workers,
                 skip=min(5, max(1, iters // 5)), bundles=bundles, timeout_s=timeout_s)
    shutil.copy(workdir / "metrics.jsonl", out_dir / "train_metrics.jsonl")
    return {"config": "configs/demo.py shrunk, stand-in teachers" if tiny else
            "configs/gpfm_vitl14.py, UNI / Phikon / CONCH bundles with random weights",
            "random_bundles_s": round(bundles_s, 2), "metrics": "train_metrics.jsonl", **result}


def breakdown(workdir: Path, skip: int) -> dict[str, Any]:
    """The loop's figures over the metrics rows of iterations skip.. (iteration 0 compiles; `perf/iteration_s`
    starts at iteration 1)."""
    from gpfm_jax.train.metrics_writer import read_metrics

    rows = [row for _, row in sorted(read_metrics(workdir).items())]
    if not rows:
        raise RuntimeError(f"{workdir}: no metrics rows")
    steady = [r for r in rows[skip:] if "perf/iteration_s" in r]
    if not steady:
        raise RuntimeError(f"{workdir}: no steady iteration after the first {skip}")
    period = sum(r["perf/iteration_s"] for r in steady)
    step = sum(r["perf/step_s"] for r in steady)
    wait = sum(r["perf/data_wait_s"] for r in steady)
    return {
        "iterations": len(rows), "steady_iterations": len(steady), "skipped_first": skip,
        "iteration_s": period / len(steady), "step_s": step / len(steady),
        "data_wait_s": wait / len(steady), "data_s": sum(r["perf/data_s"] for r in steady) / len(steady),
        "h2d_s": sum(r["perf/h2d_s"] for r in steady) / len(steady),
        "device_idle_share": 1.0 - step / period, "loop_data_wait_share": wait / period,
        "first_loss": rows[0]["loss/total"], "last_loss": rows[-1]["loss/total"],
    }
