"""Which part of the input this process extracts, when several processes (the hosts of a pod, or processes started
by hand) work on one input.

- Slides: a deterministic, size-balanced split (largest first, each to the least-loaded process; ties by list
  position), computed from the whole slide list, so every process derives the same assignment without talking to
  the others and each slide belongs to exactly one process. It does not depend on which slides are already done, so
  processes that look at the output folder at different moments still agree; finished slides are skipped by whoever
  owns them.
- Tile sets (a folder or JSON index): process i takes the contiguous range [N*i/n, N*(i+1)/n) and writes it as a
  part file next to the output (`NAME.part-00001-of-00004.h5`, atomic like every output); process 0 waits for all
  parts and merges them, in order, into the one output file, then deletes the parts. A rerun skips parts (and an
  output) that exist.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from gpfm_jax import storage

log = logging.getLogger("gpfm_jax.extract")


@dataclasses.dataclass(frozen=True)
class Share:
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"--process-index {self.index} / --process-count {self.count}: need 0 <= index < count")

    @property
    def alone(self) -> bool:
        return self.count == 1


def current_share(index: int | None = None, count: int | None = None) -> Share:
    """The given index/count, else jax's (jax.process_index/count: 0 of 1 unless jax.distributed is initialised)."""
    if (index is None) != (count is None):
        raise ValueError("give both --process-index and --process-count, or neither")
    if index is None:
        import jax

        index, count = jax.process_index(), jax.process_count()
    return Share(int(index), int(count))


def file_sizes(paths: Sequence[str | os.PathLike]) -> list[int]:
    """Sizes in bytes (one metadata request per object for URLs, asked 16 at a time); 0 for a missing file (it
    then fails, reported, in its owner's run)."""
    def size(p) -> int:
        try:
            if storage.is_url(p):
                return int(storage.resolve(p).stat().length)
            return os.path.getsize(p)
        except (OSError, FileNotFoundError):
            return 0

    if not any(storage.is_url(p) for p in paths):
        return [size(p) for p in paths]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(size, paths))


def balanced_split(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Indices per process: largest first to the least-loaded process (LPT; at most 4/3 of the optimum), each
    process's indices in list order. Deterministic: ties broken by position and process number."""
    loads, parts = [0] * count, [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        k = min(range(count), key=lambda k: (loads[k], k))
        parts[k].append(i)
        loads[k] += int(sizes[i])
    return [sorted(p) for p in parts]


def tile_range(num_tiles: int, share: Share) -> range:
    return range(num_tiles * share.index // share.count, num_tiles * (share.index + 1) // share.count)


def part_path(out: Path, share: Share, index: int | None = None) -> Path:
    i = share.index if index is None else index
    return out.with_name(f"{out.stem}.part-{i:05d}-of-{share.count:05d}.h5")


def merge_parts(out: Path, share: Share, wait_s: float, poll_s: float = 1.0) -> bool:
    """Process 0: waits (up to wait_s) for every part, writes them in order into `out` (atomic), deletes the parts.
    False if parts are still missing after wait_s (a rerun finishes them)."""
    from gpfm_jax.extract.h5out import AtomicH5, reserve_bytes

    parts = [part_path(out, share, i) for i in range(share.count)]
    deadline = time.monotonic() + wait_s
    while True:
        missing = [p for p in parts if not p.exists()]
        if not missing:
            break
        if time.monotonic() >= deadline:
            log.error("%s: parts still missing after %.0f s: %s; rerun to finish them", out, wait_s,
                      ", ".join(p.name for p in missing))
            return False
        time.sleep(poll_s)
    with h5py.File(parts[0], "r") as f:
        attrs = {k: v for k, v in f.attrs.items() if k not in ("num_tiles", "num_failed", "part", "parts")}
        dim = f["features"].shape[1]
    rows = 0
    for p in parts:
        with h5py.File(p, "r") as f:
            rows += len(f["features"])
    failed: list = []
    with AtomicH5(out, attrs, reserve=reserve_bytes(rows, 4 * dim + 256)) as h5:
        h5.create("features", (dim,), np.float32)
        h5.create("paths", (), h5py.string_dtype())
        h5.create("failed_paths", (), h5py.string_dtype())
        for p in parts:
            with h5py.File(p, "r") as f:
                h5.append("features", f["features"][()])
                h5.append("paths", f["paths"].asstr()[()].tolist())
                failed += f["failed_paths"].asstr()[()].tolist()
        h5.append("failed_paths", failed)
        h5.set_attrs(num_tiles=rows, num_failed=len(failed))
    for p in parts:
        p.unlink(missing_ok=True)
    log.info("%s: merged %d parts (%d tiles)", out, len(parts), rows)
    return True
