"""The run's feed, from the host pipeline to the step: this process's data shards merged into one per-process batch
(`DataStream`), and a background thread that reads the next batches and puts them on the devices as global arrays
while the current step runs (`Prefetcher`). The batch's keys and layout: `data/batch.py`.

Each prefetched batch carries the stream position *after* it (`DataPosition`): a checkpoint saved after iteration i
stores the position of batch i, not of the batches already read ahead, so a resumed run reads exactly the batches
the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from gpfm_jax.data.batch import NUM_SKIPPED
from gpfm_jax.step import sharding


class DataStream:
    """This process's data shards, each a grain iterator (its own shuffle, crops and masks), merged per step into
    one sample-major per-process batch; num_skipped summed. Shard s of S reads records s, s + S, ... of the source.
    `data`: the pipeline's settings (the run's DataConfig, masking grid resolved); `seed`: the run's config.seed."""

    def __init__(self, source: Any, data: Any, shard_indices: list[int], shard_count: int, seed: int):
        import grain

        from gpfm_jax.data.pipeline import make_iterator

        self._indices = list(shard_indices)
        self._count = shard_count
        self.iterators = {i: make_iterator(source, data, grain.sharding.ShardOptions(i, shard_count, True), seed=seed)
                          for i in shard_indices}

    @property
    def shard_indices(self) -> list[int]:
        return self._indices

    @property
    def shard_count(self) -> int:
        return self._count

    def get_shard_states(self) -> dict[int, Any]:
        return {i: it.get_state() for i, it in self.iterators.items()}

    def set_shard_states(self, states: dict[int, Any]) -> None:
        for i, state in states.items():
            self.iterators[i].set_state(state)

    def position(self) -> "DataPosition":
        return DataPosition(self.get_shard_states(), self._indices, self._count)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], int]:
        parts, skipped = [], 0
        for i in self._indices:
            batch = dict(next(self.iterators[i]))
            skipped += int(batch.pop(NUM_SKIPPED, 0))
            parts.append(batch)
        if len(parts) == 1:
            return parts[0], skipped
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, skipped


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """A snapshot of the stream's shard states (what checkpoint.DataStateHandler saves)."""

    states: dict[int, Any]
    shard_indices: list[int]
    shard_count: int

    def get_shard_states(self) -> dict[int, Any]:
        return self.states


@dataclasses.dataclass
class Prefetched:
    iteration: int  # the iteration this batch feeds
    batch: Any  # global arrays on the devices
    skipped: int  # unreadable records skipped by this process for this batch
    position: DataPosition  # the stream position after this batch
    data_s: float  # producing the host batch (read, decode, augment, collate)
    h2d_s: float  # putting it on the devices (until the transfer is done)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Reads batch i+1 and puts it on the devices of `mesh` (each process's rows are its share of the global batch,
    split over the batch axes: `step.sharding.global_batch`) while step i runs. `transform(iteration, batch)` may
    change a host batch before the transfer (a testing aid injects NaNs there). `get()` waits for the next batch;
    an error in the thread is re-raised in `get()`."""

    def __init__(self, stream: DataStream, mesh: Mesh, first_iteration: int, depth: int = 1,
                 transform: Callable[[int, dict], dict] | None = None):
        self.stream = stream
        self.mesh = mesh
        self.transform = transform
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._next = first_iteration
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gpfm-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                local, skipped = next(self.stream)
                position = self.stream.position()
                if self.transform is not None:
                    local = self.transform(self._next, local)
                t1 = time.perf_counter()
                batch = jax.block_until_ready(sharding.global_batch(local, self.mesh))
                item = Prefetched(self._next, batch, skipped, position, t1 - t0, time.perf_counter() - t1)
                self._next += 1
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self._error = err
            try:
                self._queue.put_nowait(_Failed(err))
            except queue.Full:  # get() finds it once the queued batch is taken
                pass

    def get(self, timeout: float) -> Prefetched | None:
        """The next batch, or None if none came within `timeout` seconds (the caller polls its deadline)."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            if self._error is not None:
                raise self._error
            return None
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        """Stops reading ahead (a thread blocked inside the source is left behind: it is a daemon)."""
        self._stop.set()
        self._thread.join(timeout=2.0)
