"""`gpfm-bench run`: every encoder x task cell of a suite, computing only what is not cached.

For each cell the key is known before anything is computed (encoder content key, the input set's content, the
labels, the protocol and seed), so a finished cell is skipped without loading its encoder or its features, a
missing one extracts only the feature sets it lacks, and a killed run resumes at the first cell (or slide) it had
not finished: cells, feature files and slides are each written under a temporary name and renamed.

Writes `<out>/run.json` (the suite as resolved: encoder keys, cell keys, the cache folder) before the first cell,
and appends one JSON line per event to `<out>/log.jsonl` (convert, extract, features_cached, evaluate,
cell_cached), which is also how the tests count what a run recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpfm_jax.encoder_bench import features as feats
from gpfm_jax.encoder_bench import tasks as task_runner
from gpfm_jax.encoder_bench.cache import Store, digest, read_json
from gpfm_jax.encoder_bench.datasets import slide_set, tile_set
from gpfm_jax.encoder_bench.suite import TEXT_TASKS, TILE_TASKS, Suite, TaskSpec, load_suite
from gpfm_jax.evaluation.results import write_json_atomic

log = logging.getLogger("gpfm_jax.encoder_bench")
CELL_FORMAT = "gpfm_jax.bench.cell"  # a stored format id (the package was gpfm_jax.bench): kept, caches stay valid
CELL_VERSION = 1
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"


@dataclasses.dataclass
class RunStats:
    cells: int = 0
    evaluated: int = 0  # cells computed in this run
    cached_cells: int = 0
    extracted: int = 0  # feature sets (or batches of missing slides) extracted in this run
    cached_features: int = 0
    converted: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


class EventLog:
    """Appends events to log.jsonl (flushed per line) and counts them."""

    def __init__(self, path: Path, stats: RunStats):
        self.path, self.stats = path, stats
        self.file = open(path, "a", buffering=1)

    def __call__(self, event: str, **fields: Any) -> None:
        self.file.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")
        self.stats.counts[event] = self.stats.counts.get(event, 0) + 1
        attr = {"evaluate": "evaluated", "cell_cached": "cached_cells", "extract": "extracted",
                "features_cached": "cached_features", "convert": "converted"}.get(event)
        if attr:
            setattr(self.stats, attr, getattr(self.stats, attr) + 1)

    def close(self) -> None:
        self.file.close()


def cell_path(store: Store, key: str) -> Path:
    return store.root / "cells" / f"{key}.json"


class _Datasets:
    """Each dataset's items and labels, resolved once (hashing its files) when a cell first needs it."""

    def __init__(self, suite: Suite, store: Store):
        self.suite, self.store, self.cache = suite, store, {}

    def __getitem__(self, name: str):
        if name not in self.cache:
            ds = self.suite.datasets[name]
            self.cache[name] = (tile_set(ds, self.store.hashes) if ds.level == "tiles" else
                                slide_set(ds, self.store.hashes, self.store))
        return self.cache[name]


def _feature_identity(enc: feats.Encoder, task: TaskSpec, suite: Suite, dsets: _Datasets) -> Any:
    ds = suite.datasets[task.dataset]
    items = dsets[task.dataset]
    if task.type in TILE_TASKS or task.type == "vqa":
        return digest({"encoder": enc.key, "tiles": items.content})
    folder, stems = feats.slide_feature_keys(enc, ds, items)
    return digest([folder, sorted(stems.items())])


def plan(suite: Suite, store: Store, events: EventLog) -> tuple[dict[str, feats.Encoder], _Datasets, dict]:
    """Encoders resolved (converted when given as weight files) and the key of every cell."""
    encoders = {n: feats.resolve_encoder(s, store, events) for n, s in suite.encoders.items()}
    dsets = _Datasets(suite, store)
    cells = {}
    for tname, task in suite.tasks.items():
        label_key = dsets[task.dataset].label_key
        for ename, enc in encoders.items():
            cells.setdefault(tname, {})[ename] = digest({
                "format": CELL_VERSION, "features": _feature_identity(enc, task, suite, dsets), "labels": label_key,
                "protocol": task.protocol(suite.seed)})
    store.hashes.save()
    return encoders, dsets, cells


def _compute_cell(enc: feats.Encoder, task: TaskSpec, suite: Suite, dsets: _Datasets, store: Store,
                  events: EventLog, progress: bool) -> dict[str, Any]:
    ds = suite.datasets[task.dataset]
    items = dsets[task.dataset]
    if task.type in TILE_TASKS or task.type == "vqa":
        path = feats.tile_features(enc, ds, items, store, events, progress)
        if task.type == "vqa":
            return task_runner.run_text_task(task, suite.seed, path, items, ds.synthetic)
        return task_runner.run_tile_task(task, suite.seed, path, items)
    view = feats.slide_features(enc, ds, items, store, events, progress)
    if task.type in TEXT_TASKS:
        return task_runner.run_text_task(task, suite.seed, view, items, ds.synthetic)
    return task_runner.run_slide_task(task, suite.seed, view, items)


def run_suite(suite_path: str | os.PathLike, out: str | os.PathLike, cache: str | os.PathLike | None = None,
              progress: bool = True) -> RunStats:
    suite = load_suite(suite_path)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    store = Store(cache or out / "cache")
    stats = RunStats()
    start = time.perf_counter()
    events = EventLog(out / LOG_FILE, stats)
    events("run_start", suite=str(suite.path), cache=str(store.root))
    try:
        encoders, dsets, cells = plan(suite, store, events)
        write_json_atomic(out / RUN_FILE, {
            "suite": str(suite.path), "suite_text": suite.path.read_text(), "name": suite.name, "seed": suite.seed,
            "cache": str(store.root),
            "encoders": {n: {"key": e.key, **e.info} for n, e in encoders.items()},
            "tasks": {n: {"type": t.type, "dataset": t.dataset, "metrics": list(t.metrics), "folds": t.folds,
                          "params": t.params} for n, t in suite.tasks.items()},
            "cells": cells})
        stats.cells = sum(len(v) for v in cells.values())
        bar = tqdm(total=stats.cells, unit="cell", desc="gpfm-bench", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        with bar:
            for ename, enc in encoders.items():
                for tname, task in suite.tasks.items():
                    key = cells[tname][ename]
                    bar.set_postfix_str(f"{ename} x {tname}")
                    target = cell_path(store, key)
                    if read_json(target) is not None:
                        events("cell_cached", encoder=ename, task=tname, key=key)
                        bar.update(1)
                        continue
                    t0 = time.perf_counter()
                    result = _compute_cell(enc, task, suite, dsets, store, events, progress)
                    seconds = time.perf_counter() - t0
                    write_json_atomic(target, {
                        "format": CELL_FORMAT, "version": CELL_VERSION, "key": key, "encoder": ename,
                        "encoder_key": enc.key, "task": tname, "type": task.type, "dataset": task.dataset,
                        "protocol": task.protocol(suite.seed), "seed": suite.seed, "seconds": round(seconds, 3),
                        **result})
                    events("evaluate", encoder=ename, task=tname, key=key, seconds=round(seconds, 3))
                    bar.update(1)
                enc._loaded = None  # free the encoder's device memory before the next one
                store.hashes.save()
    finally:
        store.hashes.save()
        stats.seconds = time.perf_counter() - start
        events("run_end", evaluated=stats.evaluated, extracted=stats.extracted, seconds=round(stats.seconds, 2))
        events.close()
    return stats
