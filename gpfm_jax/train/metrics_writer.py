"""Where a run's metrics go: a per-iteration JSONL log, TensorBoard event files (tensorboardX) and a tqdm progress
bar with ETA and images/s. Only the primary process (jax.process_index() == 0) writes.

Rows also carry the loop's time breakdown (`perf/data_wait_s`, `perf/data_s`, `perf/h2d_s`, `perf/step_s`,
`perf/iteration_s`, `perf/images_per_s`; docs/training.md, "Where the time goes")."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """`start(step)` opens the progress bar; `write_step` logs one iteration's metrics (their `perf/iteration_s`
    feeds the bar's images/s)."""

    def __init__(self, workdir: str | Path, *, primary: bool, total_steps: int, batch_size: int,
                 tb_every: int = 10, tensorboard: bool = True, progress: bool = True):
        self.primary = primary
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.tb_every = max(1, tb_every)
        self.progress = progress
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._ips = None
        if not primary:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / METRICS_FILE
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as f:  # a killed run may have left half a line: end it
                f.write("\n")
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            self._tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=10)

    def start(self, start_step: int) -> None:
        if self.primary and self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=start_step, unit="it", dynamic_ncols=True,
                             mininterval=1.0, smoothing=0.1)

    def write_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """`step`: the 0-based iteration the metrics come from."""
        dt = metrics.get("perf/iteration_s")
        if dt:  # absent for the first iteration after a start (it includes compilation)
            ips = self.batch_size / max(dt, 1e-9)
            self._ips = ips if self._ips is None else 0.8 * self._ips + 0.2 * ips
        if not self.primary:
            return
        row = {"step": int(step), **{k: _json_float(v) for k, v in metrics.items()}}
        if self._ips is not None:
            row["perf/images_per_s"] = self._ips
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None and (step % self.tb_every == 0 or not math.isfinite(row.get("loss/total", 0.0))):
            for k, v in row.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            post = {"loss": f"{row.get('loss/total', float('nan')):.4f}"}
            if self._ips is not None:
                post["img/s"] = f"{self._ips:.1f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)

    def write_scalars(self, step: int, metrics: Mapping[str, float], kind: str = "sanity") -> None:
        """Extra scalars (the sanity metrics, the end-of-run probe): JSONL row with a "kind" and TensorBoard."""
        if not self.primary:
            return
        row = {"step": int(step), "kind": kind, **{k: _json_float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)

    def write_event(self, step: int, kind: str, fields: Mapping[str, Any],
                    scalars: Mapping[str, float] | None = None) -> None:
        """A JSONL row of `kind` with arbitrary JSON fields (a collapse verdict: text and numbers), and `scalars` to
        TensorBoard (e.g. a marker at the verdict's iteration)."""
        if not self.primary:
            return
        self._jsonl.write(json.dumps({"step": int(step), "kind": kind, **fields}) + "\n")
        if self._tb is not None:
            for k, v in (scalars or {}).items():
                self._tb.add_scalar(k, float(v), step)

    def message(self, text: str) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._jsonl = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without dragging in PyTorch (it only probes for torch.Tensor): saves
    seconds at startup when torch is installed."""
    import sys

    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX's guarded probe
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _json_float(v: Any) -> float:
    return float(v)  # json writes NaN / Infinity as such (read back by Python's json)


def read_metrics(workdir: str | Path) -> dict[int, dict[str, Any]]:
    """Per-iteration rows of a run's JSONL log; a resumed run's re-done iterations replace the earlier rows."""
    from gpfm_jax import storage

    rows: dict[int, dict[str, Any]] = {}
    path = storage.resolve(workdir) / METRICS_FILE  # a local run folder or a gs:// workdir
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # half a line from a killed run
            continue
        if row.get("kind") is None:
            rows[int(row["step"])] = row
    return rows
