"""Batches of preprocessed tiles, produced by a thread pool ahead of the consumer, so reading/decoding/resizing
(PIL and openslide release the GIL) overlaps with the encoder's compute.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np


@dataclasses.dataclass
class Batch:
    items: list  # the items whose tiles were read
    tiles: np.ndarray  # uint8 [len(items), S, S, 3]
    failures: list[tuple[object, str]]  # (item, reason) of the tiles that were skipped


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch_batches(
    items: Iterable,
    read: Callable[[object], np.ndarray],
    batch_size: int,
    *,
    workers: int = 4,
    depth: int = 2,
    skip: tuple[type[BaseException], ...] = (),
) -> Iterator[Batch]:
    """Yields Batch objects in order (items may be a lazy iterator: it is consumed in the reader thread, so work
    such as tissue detection done while producing items also overlaps with the encoder). read(item) -> uint8 [S, S, 3]; exceptions of the types in `skip` drop that
    tile (recorded in Batch.failures), any other exception is re-raised in the consumer. At most `depth` finished
    batches wait in the queue, and one more is being read, so memory stays bounded."""
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(x) -> None:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return
            except queue.Full:
                continue

    def guarded(item):
        try:
            return read(item), None
        except skip as e:
            return None, f"{type(e).__name__}: {e}"

    def produce() -> None:
        try:
            source = iter(items)
            with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="gpfm-extract-read") as pool:
                pending: collections.deque = collections.deque()

                def submit_next() -> None:
                    # each item is submitted as soon as it is drawn: drawing the next one may wait on the reads of
                    # the ones before (a slide download waits for the previous slide's reads to free the cache)
                    chunk, futures = [], []
                    for item in itertools.islice(source, batch_size):
                        chunk.append(item)
                        futures.append(pool.submit(guarded, item))
                    if chunk:
                        pending.append((chunk, futures))

                submit_next()
                submit_next()  # one chunk in flight ahead of the one being assembled
                while pending and not stop.is_set():
                    chunk, futures = pending.popleft()
                    submit_next()
                    results = [f.result() for f in futures]
                    ok = [(item, r[0]) for item, r in zip(chunk, results) if r[1] is None]
                    failures = [(item, r[1]) for item, r in zip(chunk, results) if r[1] is not None]
                    tiles = np.stack([t for _, t in ok]) if ok else np.zeros((0, 0, 0, 3), np.uint8)
                    put(Batch([item for item, _ in ok], tiles, failures))
                if stop.is_set():
                    for _, futures in pending:
                        for f in futures:
                            f.cancel()
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))

    thread = threading.Thread(target=produce, name="gpfm-extract-producer", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Failure):
                raise x.error
            yield x
    finally:
        stop.set()
        thread.join()
