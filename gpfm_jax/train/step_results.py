"""Reading the steps' results without stalling the host loop.

- `StepReader`: a thread that copies each dispatched step's metrics off the devices in order and notes when each
  step finished. The loop dispatches step i+1 before it looks at step i's metrics, so the devices always have the
  next step queued while the host logs, checks for a non-finite loss and prepares data (which is why that check
  acts one step late: docs/training.md).
- `HostFlags`: per-process counters that every process must agree on (skipped records, "a signal arrived") summed
  over processes by a tiny jitted reduction that is dispatched with the step and read with its metrics: no
  blocking host collective per iteration, and all processes see the same sums at the same iteration.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from gpfm_jax.step import sharding

FLAGS = ("skipped", "stop")


class HostFlags:
    """`reduce(values: int[len(FLAGS)])` -> the per-flag sums over all processes (a device array in multi-process
    runs, dispatched asynchronously; the numpy values themselves in a single-process run)."""

    def __init__(self, mesh: Mesh):
        self.multi = jax.process_count() > 1
        if not self.multi:
            return
        self.sharding = NamedSharding(mesh, sharding.batch_sharding(mesh).spec)
        self.local_rows = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self.jitted = jax.jit(lambda x: jnp.sum(x, 0), out_shardings=sharding.replicated(mesh))

    def reduce(self, values) -> Any:
        values = np.asarray(values, np.int32)
        if not self.multi:
            return values
        local = np.zeros((self.local_rows, len(values)), np.int32)
        local[0] = values  # one row per local device: only the first carries this process's counts
        return self.jitted(jax.make_array_from_process_local_data(self.sharding, local))


@dataclasses.dataclass
class StepOutcome:
    iteration: int
    metrics: dict[str, float]
    flags: dict[str, int]  # summed over processes
    sanity: dict[str, float] | None
    dispatched: float  # perf_counter() when the step was dispatched
    ready: float  # perf_counter() when its results were on the host
    extra: Any  # what the loop attached (the prefetched batch's timings)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class StepReader:
    def __init__(self):
        self._in: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self.pending = 0  # submitted, not yet taken with get()
        self._thread = threading.Thread(target=self._run, name="gpfm-step-reader", daemon=True)
        self._thread.start()

    def submit(self, iteration: int, metrics: Any, flags: Any, sanity: Any, dispatched: float, extra: Any) -> None:
        self.pending += 1
        self._in.put((iteration, metrics, flags, sanity, dispatched, extra))

    def _run(self) -> None:
        while True:
            job = self._in.get()
            if job is None:
                return
            iteration, metrics, flags, sanity, dispatched, extra = job
            try:
                metrics, flags, sanity = jax.device_get((metrics, flags, sanity))
                ready = time.perf_counter()
                outcome = StepOutcome(
                    iteration, {k: float(v) for k, v in metrics.items()},
                    {k: int(v) for k, v in zip(FLAGS, np.asarray(flags).reshape(-1))},
                    None if sanity is None else {k: float(v) for k, v in sanity.items()}, dispatched, ready, extra)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self._out.put(_Failed(err))
                return
            self._out.put(outcome)

    def get(self, timeout: float) -> StepOutcome | None:
        """The oldest pending step's outcome, or None if it is not ready within `timeout` seconds."""
        try:
            item = self._out.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, _Failed):
            raise item.error
        self.pending -= 1
        return item

    def close(self) -> None:
        self._in.put(None)
        self._thread.join(timeout=2.0)
