"""The joint, paired bootstrap over a whole suite, vectorised with JAX.

One replicate resamples the patients of every task with replacement and recomputes every encoder's metric on that
same resample (paired: encoders are compared on identical data); `ranking` then re-ranks the encoders per task and
averages over tasks. A resample is a multiset, so a replicate is a vector of unit counts (how often each patient was
drawn) and every metric is computed exactly from the original rows weighted by their patient's count (`weighted`).

Layout. Every task is cut into *columns*: the rows of one (encoder, group[, class]) with everything fixed
precomputed (AUC: the negatives in score order and, per positive, where its tie starts and ends among them;
classification: class and prediction; c-index: the pair matrices summed per patient pair; per-row values). Columns
of all tasks are padded to power-of-two lengths and stacked per (metric family, padded shape), so a suite of any
size is a few arrays and one compiled program per family (5; compiled ahead of time in parallel threads); the
counts of all tasks are one [units + 1, B] array (the last row, always 0, is where padding points). A step computes
B replicates at once, with the replicate batch as the last, contiguous axis, running a bucket's columns a few at a
time (`jax.lax.map`) so the working set stays in cache; batches of replicates are run by one thread per core.

The draws: task t's replicate r is row r of `numpy.random.default_rng([seed, crc32(task name)])`'s integers(0, P_t,
(., P_t)) stream: it depends only on the seed, the task's name, r and its patient count, so adding or removing
other tasks or encoders, or changing the batch size, leaves it unchanged (drawing is cheap next to the metrics;
`replicate_counts` returns one for checks).

A task's value is the mean over its groups (cross-validation folds, few-shot episodes; one group otherwise) of the
metric of the group's rows, as gpfm-eval's summaries; a group left without weight (or without a positive, or a
comparable pair) in a replicate is undefined and left out of that mean, and a multi-class AUC is the mean of its
defined one-vs-rest AUCs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from gpfm_jax.encoder_bench import weighted

CLASS_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
SURVIVAL_METRICS = ("c_index",)


@dataclasses.dataclass
class TaskPredictions:
    """One task's out-of-sample predictions: the same rows, in the same order, for every encoder."""

    name: str
    metric: str  # accuracy | balanced_accuracy | macro_f1 | auc | c_index | any per-row value (e.g. "acc@1")
    units: np.ndarray  # int [n]: resampling unit (patient) of each row, 0..P-1
    groups: np.ndarray  # int [n]: fold / episode of each row
    scores: np.ndarray  # [E, n, C] class scores | [E, n] risk | [E, n] per-row values
    y: np.ndarray | None = None  # int [n] class of each row (classification)
    time: np.ndarray | None = None  # [n] (survival)
    event: np.ndarray | None = None  # bool [n] (survival)
    num_classes: int | None = None

    def family(self) -> str:
        if self.metric in CLASS_METRICS:
            return "class"
        if self.metric == "auc":
            return "auc"
        if self.metric in SURVIVAL_METRICS:
            return "cindex"
        return "values"

    @property
    def num_units(self) -> int:
        return int(self.units.max()) + 1

    @property
    def classes(self) -> int:
        return int(self.num_classes or self.scores.shape[2])

    def check(self) -> None:
        n = len(self.units)
        if len(self.groups) != n or self.scores.shape[1] != n:
            raise ValueError(f"task {self.name}: {n} units, {len(self.groups)} groups, {self.scores.shape[1]} "
                             f"score rows")
        if self.units.min() < 0:
            raise ValueError(f"task {self.name}: negative unit index")
        fam = self.family()
        if fam in ("class", "auc") and (self.y is None or self.scores.ndim != 3):
            raise ValueError(f"task {self.name}: metric {self.metric} needs class labels and [E, n, C] scores")
        if fam == "cindex" and (self.time is None or self.event is None or self.scores.ndim != 2):
            raise ValueError(f"task {self.name}: c_index needs time, event and [E, n] risks")
        if fam == "values" and self.scores.ndim != 2:
            raise ValueError(f"task {self.name}: metric {self.metric} needs [E, n] per-row values")
        if not np.isfinite(self.scores).all():
            raise ValueError(f"task {self.name}: predictions contain NaN or Inf")


def task_uid(name: str) -> int:
    """A stable 31-bit id of a task name: the random stream of its resamples."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, task_uid(name)])


def replicate_counts(seed: int, name: str, replicate: int, num_units: int) -> np.ndarray:
    """int [num_units]: how often each unit is drawn in replicate `replicate` of task `name` (as the bootstrap)."""
    rng = _rng(seed, name)
    rng.integers(0, num_units, (replicate, num_units))  # advance the stream past the earlier replicates
    return np.bincount(rng.integers(0, num_units, num_units), minlength=num_units)


def bucket(n: int, smallest: int = 16, base: int = 2) -> int:
    """Next power of `base` >= n: a padded column length (at most `base` x the work, few compiled shapes)."""
    size = smallest
    while size < n:
        size *= base
    return size


# ------------------------------------------------------------------------------------------------ columns (NumPy)


# each family's fields and the axis length each is padded along ("n", "p"); unit fields pad with the dummy unit.
# Lengths are padded to powers of 2 from 128 (c-index pair matrices from 16). Compiling is most of a first report's
# CPU time, so the shapes are few; measured in CPU seconds on the 72-task suite of tools/bench_ranking.py: from 16,
# 29 shapes, compile 12.0 s + 1,000 replicates 9.4 s; from 128, 18 shapes, 7.1 + 8.4 s; from 512, 13 shapes,
# 4.7 + 11.6 s; powers of 4 instead of 2: about 2 s less compile, 8.6 s more per 1,000 replicates.
_BASE = {"auc": 2, "class": 2, "values": 2, "cindex": 2, "cindex_den": 2}
_SMALLEST = {"auc": 128, "class": 128, "values": 128, "cindex": 16, "cindex_den": 16}
_FIELDS = {
    "auc": {"neg_unit": "n", "pos_unit": "p", "lo": "p", "hi": "p"},
    "class": {"unit": "n", "y": "n", "pred": "n"},
    "values": {"unit": "n", "value": "n"},
    "cindex": {"units": "p", "pairs": "pp"},
    "cindex_den": {"units": "p", "pairs": "pp"},
}


class _Family:
    """The columns of one metric family, stacked per padded shape. Per bucket `owners` [cols, 4]: (task, encoder,
    group, class slot) of each column."""

    def __init__(self, name: str):
        self.name, self.fields = name, _FIELDS[name]
        self.items: dict[tuple, list[tuple[tuple[int, ...], dict[str, np.ndarray]]]] = {}

    def add(self, owner: tuple[int, ...], **arrays: np.ndarray) -> None:
        dims = {}
        for f, axis in self.fields.items():
            dims.setdefault(axis[0], len(arrays[f]))
        key = tuple(bucket(dims[d], _SMALLEST[self.name], _BASE[self.name]) for d in sorted(dims))
        self.items.setdefault(key, []).append((owner, arrays))

    def stacked(self, dummy: int) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
        arrays, owners = [], []
        for key, items in sorted(self.items.items()):
            size = dict(zip(sorted({a[0] for a in self.fields.values()}), key))
            out = {}
            for f, axis in self.fields.items():
                shape = (len(items), *(size[a] for a in axis))
                dtype = items[0][1][f].dtype
                full = np.full(shape, dummy if f.endswith(("unit", "units")) else 0, dtype)
                for i, (_, a) in enumerate(items):
                    full[(i, *(slice(0, d) for d in a[f].shape))] = a[f]
                out[f] = full
            arrays.append(out)
            owners.append(np.array([o for o, _ in items], np.int64))
        return arrays, owners


def _columns(tasks: list[TaskPredictions]) -> tuple[dict[str, _Family], np.ndarray, int]:
    """Every task cut into columns (see the module docstring); returns the families, each task's unit offset into
    the global counts, and the index of the dummy unit."""
    fams = {name: _Family(name) for name in _FIELDS}
    offsets = np.cumsum([0] + [t.num_units for t in tasks])
    for ti, task in enumerate(tasks):
        task.check()
        fam, off = task.family(), int(offsets[ti])
        for g, rows in enumerate(np.flatnonzero(task.groups == v) for v in np.unique(task.groups)):
            units = (task.units[rows] + off).astype(np.int32)
            for e in range(len(task.scores)):
                if fam == "class":
                    fams["class"].add((ti, e, g, 0), unit=units,
                                      y=task.y[rows].astype(np.int32),
                                      pred=task.scores[e, rows].argmax(1).astype(np.int32))
                elif fam == "values":
                    fams["values"].add((ti, e, g, 0), unit=units, value=task.scores[e, rows].astype(np.float32))
                elif fam == "auc":
                    for k, c in enumerate([1] if task.classes == 2 else range(task.classes)):
                        neg, pos, lo, hi = weighted.auc_layout(task.scores[e, rows, c], task.y[rows] == c)
                        fams["auc"].add((ti, e, g, k), neg_unit=units[neg], pos_unit=units[pos], lo=lo, hi=hi)
            if fam == "cindex":  # pair matrices summed per unit pair of this group
                ulist, local = np.unique(units, return_inverse=True)
                member = np.zeros((len(ulist), len(rows)))
                member[local, np.arange(len(rows))] = 1.0
                for e in range(len(task.scores)):
                    conc, comp = weighted.cindex_pairs(task.time[rows], task.event[rows], task.scores[e, rows])
                    fams["cindex"].add((ti, e, g, 0), units=ulist.astype(np.int32),
                                       pairs=(member @ conc @ member.T).astype(np.float32))
                fams["cindex_den"].add((ti, 0, g, 0), units=ulist.astype(np.int32),
                                       pairs=(member @ comp @ member.T).astype(np.float32))
    return fams, offsets, int(offsets[-1])


# ------------------------------------------------------------------------------------------------ one step (JAX)


def _column(fam: str, classes: int, col: dict[str, jax.Array], counts: jax.Array) -> jax.Array:
    """One column's value(s) [B] (classification: [3, B], accuracy, balanced accuracy, macro-F1) under the unit
    counts [units + 1, B]."""
    if fam == "auc":
        return weighted.auc_column(counts[col["neg_unit"]], counts[col["pos_unit"]], col["lo"], col["hi"])
    if fam == "class":
        w = counts[col["unit"]]  # [N, B]
        y1 = jax.nn.one_hot(col["y"], classes, dtype=w.dtype)  # [N, C]
        p1 = jax.nn.one_hot(col["pred"], classes, dtype=w.dtype)
        support, hits, predicted = y1.T @ w, (y1 * p1).T @ w, p1.T @ w  # [C, B]
        return jnp.stack([weighted.class_metric(m, support, hits, predicted) for m in CLASS_METRICS])
    if fam == "values":
        w = counts[col["unit"]]
        total = w.sum(0)
        return jnp.where(total > 0, col["value"] @ w / jnp.maximum(total, 1.0), jnp.nan)
    return weighted.bilinear(col["pairs"], counts[col["units"]])  # c-index numerator or denominator


_GROUP_ELEMENTS = 2**17  # a lax.map step handles about this many weights (cache-sized; amortises the loop overhead)


@functools.partial(jax.jit, static_argnames=("fam", "classes"))
def _family_step(fam: str, classes: int, buckets: list[dict[str, jax.Array]], counts: jax.Array):
    """Per bucket [cols, ..., B]: its columns a few at a time (lax.map: the working set stays in cache; the
    replicate batch B is the vectorised axis). `classes`: the widest classification task's class count
    (narrower tasks' extra classes have no rows and drop out of every class metric)."""
    out = []
    dummy = counts.shape[0] - 1
    for b in buckets:
        cols, per_column = next(iter(b.values())).shape[0], sum(v.shape[1] for k, v in b.items() if "unit" in k)
        group = max(1, min(cols, _GROUP_ELEMENTS // (per_column * counts.shape[1])))  # small columns go k at a time
        extra = -cols % group  # pad to a multiple: lax.map would compile a second body for the remainder
        if extra:
            b = {k: jnp.concatenate([v, jnp.full((extra, *v.shape[1:]), dummy if "unit" in k else 0, v.dtype)])
                 for k, v in b.items()}
        out.append(jax.lax.map(functools.partial(_column, fam, classes, counts=counts), b, batch_size=group)[:cols])
    return out


# ------------------------------------------------------------------------------------------------ the driver


@dataclasses.dataclass
class BootstrapMetrics:
    observed: np.ndarray  # [T, E]
    replicates: np.ndarray  # [R, T, E]
    batch: int  # replicates per vectorised step


def _per_column_elements(fam: str, arrays: dict[str, np.ndarray]) -> int:
    """Elements of one column's largest intermediate per replicate."""
    if fam.startswith("cindex"):
        return 2 * int(arrays["units"].shape[1])
    if fam == "auc":
        return 3 * int(arrays["neg_unit"].shape[1] + arrays["pos_unit"].shape[1])
    return 3 * int(arrays["unit"].shape[1])


def _compile_steps(device: dict[str, list], classes: int, dummy: int, batch: int) -> dict:
    """Each family's step compiled ahead of time, the families in parallel threads (XLA compiles outside the GIL;
    on a shared machine more threads also get a larger share of the cores)."""
    counts = jax.ShapeDtypeStruct((dummy + 1, batch), jnp.float32)

    def build(f):
        return _family_step.lower(f, classes if f == "class" else 0, device[f], counts).compile()

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(device), _threads())) as pool:
        return dict(zip(device, pool.map(build, device)))


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


def bootstrap_metrics(tasks: list[TaskPredictions], num_replicates: int = 1000, seed: int = 0,
                      budget: float = 2**20) -> BootstrapMetrics:
    """Every task's metric for every encoder, observed and under `num_replicates` joint paired resamples. `budget`
    bounds the elements of a column's intermediates per step (cache-sized), which sets the replicates per step
    (a multiple of 8, 8..128)."""
    e_n = tasks[0].scores.shape[0]
    if any(t.scores.shape[0] != e_n for t in tasks):
        raise ValueError("every task needs predictions of the same encoders")
    fams, offsets, dummy = _columns(tasks)
    stacked = {f: fam.stacked(dummy) for f, fam in fams.items() if fam.items}
    biggest = max(_per_column_elements(f, a) for f, (arrs, _) in stacked.items() for a in arrs)
    classes = max((t.classes for t in tasks if t.family() == "class"), default=0)
    batch = int(min(128, max(8, budget // biggest // 8 * 8)))
    device = {f: [{k: jnp.asarray(v) for k, v in a.items()} for a in arrs] for f, (arrs, _) in stacked.items()}
    total = num_replicates + 1  # replicate 0 of the output is the observed data
    results = {f: [np.empty((total, *((3,) if f == "class" else ()), len(o))) for o in owners]
               for f, (_, owners) in stacked.items()}
    rngs = [_rng(seed, t.name) for t in tasks]
    steps = _compile_steps(device, classes, dummy, batch)
    starts = iter(range(0, total, batch))
    lock = threading.Lock()

    def next_batch():
        """(start, live, counts) of the next batch; drawn in batch order under the lock, so the resamples do not
        depend on which thread runs which batch."""
        with lock:
            start = next(starts, None)
            if start is None:
                return None
            live, first = min(batch, total - start), int(start == 0)
            counts = np.zeros((dummy + 1, batch), np.float32)
            for t, task in enumerate(tasks):
                n, off = task.num_units, int(offsets[t])
                if first:
                    counts[off : off + n, 0] = 1.0
                draws = rngs[t].integers(0, n, (live - first, n))
                flat = np.bincount((np.arange(live - first)[:, None] * n + draws).ravel(),
                                   minlength=(live - first) * n)
                counts[off : off + n, first:live] = flat.reshape(live - first, n).T
            return start, live, counts

    def worker():
        while (job := next_batch()) is not None:
            start, live, counts = job
            dev_counts = jnp.asarray(counts)
            pending = {f: steps[f](arrs, dev_counts) for f, arrs in device.items()}
            for f, outs in pending.items():  # all families dispatched before the first result is fetched
                for res, out in zip(results[f], outs):  # out [cols, (3,) B] -> [B, (3,) cols]
                    out = np.asarray(out)
                    res[start : start + live] = out.transpose((out.ndim - 1, *range(1, out.ndim - 1), 0))[:live]

    with concurrent.futures.ThreadPoolExecutor(max_workers=_threads()) as pool:  # two batches in flight per core
        for f in [pool.submit(worker) for _ in range(_threads())]:
            f.result()
    values = _assemble(tasks, stacked, results, e_n, total)
    return BootstrapMetrics(values[0], values[1:].astype(np.float32), batch)


def _assemble(tasks, stacked, results, e_n: int, total: int) -> np.ndarray:
    """Column results -> [R + 1, T, E]: per task the mean over classes (AUC) and groups of the defined values."""
    sizes = {t: (int(len(np.unique(task.groups))), task.classes if task.family() == "auc" else 1)
             for t, task in enumerate(tasks)}
    per_task = {t: np.full((total, e_n, g, k), np.nan) for t, (g, k) in sizes.items()}
    den = {}
    for f, (_, owners) in stacked.items():
        for res, owner in zip(results[f], owners):
            for j, (t, e, g, k) in enumerate(owner):
                if f == "class":
                    v = res[:, CLASS_METRICS.index(tasks[t].metric), j]
                elif f == "cindex_den":
                    den[(t, g)] = res[:, j]
                    continue
                else:
                    v = res[:, j]
                per_task[t][:, e, g, k] = v
    for (t, g), d in den.items():  # c-index = concordant / comparable weight (nan without a comparable pair)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_task[t][:, :, g, 0] = np.where(d[:, None] > 0, per_task[t][:, :, g, 0] / d[:, None], np.nan)
    out = np.empty((total, len(tasks), e_n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan means are nan: undefined, said in the docstring
        for t, v in per_task.items():
            out[:, t] = np.nanmean(np.nanmean(v, axis=3), axis=2)
    return out


def percentile_ci(draws: np.ndarray, level: float = 0.95, axis: int = 0) -> np.ndarray:
    """Percentile interval along `axis` (nan draws left out): [..., 2]."""
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-nan slice gives nan (the report says so)
        return np.stack([np.nanpercentile(draws, lo, axis=axis), np.nanpercentile(draws, hi, axis=axis)], -1)
