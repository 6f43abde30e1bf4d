"""The suite file (TOML): which encoders, which datasets, which tasks. One schema, checked field by field; every
error names the file and the field (`suite.toml: tasks.crc-knn.k: expected an integer, got "20"`).

    name = "my-benchmark"
    seed = 0                                   # splits, training, few-shot episodes (one seed for everything)

    [encoders.gpfm]
    bundle = "bundles/gpfm"                    # an encoder bundle or a gpfm-train checkpoint folder (step = N)
    [encoders.uni]
    weights = "UNI/pytorch_model.bin"          # a PyTorch / safetensors file, converted on the fly ...
    convert = "uni"                            # ... by: vit (GPFM, timm / DINOv2 ViT; default) | uni | phikon | conch

    [datasets.crc]
    tiles = "data/crc"                         # a tile folder (label = class subfolder) or
    # csv = "data/crc.csv"                     #   path,label[,patient][,split] (paths relative to the CSV)
    [datasets.brca]
    slides = "data/brca/"                      # slide folder or .txt list; + labels CSV: slide_id,label|time,event
    labels = "data/brca.csv"                   #   [,case_id][,split]

    [tasks.crc-knn]
    type = "knn"                               # knn | linear | fewshot | retrieval | mil | survival | report
                                               #   | slide_vqa | vqa (text tasks: synthetic datasets only)
    dataset = "crc"
    metrics = ["balanced_accuracy", "auc"]     # the first ranks the encoders

Synthetic encoders (`synthetic = SIGNAL`, `seed`) and synthetic datasets (`synthetic = "tiles" | "slides" |
"survival" | "reports"`) make a suite whose true ranking is known (see `synthetic.py`); they only combine with each other.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TASK_TYPES = ("knn", "linear", "fewshot", "retrieval", "mil", "survival", "report", "slide_vqa", "vqa")
TEXT_TASKS = ("report", "slide_vqa", "vqa")
TEXT_METRICS = {"report": ("rouge_l",), "slide_vqa": ("answer_accuracy", "rouge_l"),  # per-row values
                "vqa": ("answer_accuracy",)}
TILE_TASKS = ("knn", "linear", "fewshot", "retrieval")
CLASS_METRICS = ("balanced_accuracy", "auc", "accuracy", "macro_f1")
RETRIEVAL_METRICS = ("acc@1", "acc@3", "acc@5", "hit@1", "hit@3", "hit@5", "map@5")
CONVERTERS = ("vit", "uni", "phikon", "conch")
SYNTHETIC_KINDS = ("tiles", "slides", "survival", "reports")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# Per task type: protocol knobs and their defaults (what a cell records as its protocol).
TASK_PARAMS: dict[str, dict[str, Any]] = {
    "knn": {"k": 20, "temperature": 0.07},
    "linear": {"lr": 1e-3, "weight_decay": 1e-4, "epochs": 100, "batch_size": 256, "patience": 10,
               "normalise": "standard", "val_fraction": 0.1},
    "fewshot": {"shots": 4, "episodes": 10},
    "retrieval": {},
    "mil": {"model": "abmil", "epochs": 50, "patience": 10, "lr": 2e-4, "weight_decay": 1e-5, "hidden_dim": 512,
            "attention_dim": 256, "dropout": 0.25, "max_instances": 0, "bucket_factor": 1.25},
}
TASK_PARAMS["survival"] = {**TASK_PARAMS["mil"], "loss": "nll_surv", "bins": 4, "batch_size": 0}
# text tasks: HistGen's / W2T's protocol by default (docs/text_tasks.md); the example suite runs tiny models
TASK_PARAMS["report"] = {"epochs": 40, "lr": 1e-4, "lr_decay": 0.8, "weight_decay": 5e-5, "clip_value": 0.1,
                         "batch_size": 1, "beam": 3, "width": 512, "heads": 8, "layers": 3, "encoder_layers": 3,
                         "dropout": 0.1, "region_size": 96, "memory_slots": 2048, "max_length": 100,
                         "min_count": 10}
TASK_PARAMS["slide_vqa"] = {**{k: v for k, v in TASK_PARAMS["report"].items() if k not in ("region_size",
                                                                                        "memory_slots")},
                            "max_length": 60, "max_question": 30, "min_count": 1}
TASK_PARAMS["vqa"] = {**TASK_PARAMS["slide_vqa"], "max_length": 8}  # tile VQA: answers ranked from a list
DEFAULT_METRICS = {"knn": ("balanced_accuracy", "auc"), "linear": ("balanced_accuracy", "auc"),
                   "fewshot": ("balanced_accuracy", "auc"), "retrieval": ("acc@1", "map@5"),
                   "mil": ("auc", "balanced_accuracy"), "survival": ("c_index",), "report": ("rouge_l",),
                   "slide_vqa": ("answer_accuracy",), "vqa": ("answer_accuracy",)}
SYNTHETIC_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiles": {"n": 600, "classes": 3, "patients": 60, "dim": 32, "seed": 0},
    "slides": {"n": 80, "patients": 80, "dim": 32, "min_tiles": 16, "max_tiles": 48, "seed": 0},
    "survival": {"n": 100, "patients": 100, "dim": 32, "min_tiles": 16, "max_tiles": 48, "censoring": 0.3,
                 "seed": 0},
    "reports": {"n": 200, "patients": 200, "dim": 16, "min_tiles": 8, "max_tiles": 24, "seed": 0},
}


class SuiteError(ValueError):
    """A bad suite file; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    name: str
    bundle: str | None = None  # bundle or training checkpoint folder
    step: int | None = None  # training checkpoint step
    weights: str | None = None  # PyTorch / safetensors file, converted on the fly
    convert: str = "vit"
    arch: str | None = None  # vit conversion: require this architecture
    num_heads: int | None = None  # vit conversion: head count of a non-standard width
    synthetic: float | None = None  # signal strength of a synthetic encoder
    seed: int = 0  # synthetic encoder's noise
    output: str | None = None  # which model output is the feature (default: the bundle's)
    dtype: str = "float32"
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # tiles | slides | synthetic
    tiles: str | None = None  # tile folder
    csv: str | None = None  # tiles: path,label CSV
    slides: str | None = None  # slide folder or list
    labels: str | None = None  # slides: label CSV
    patient: str | None = None  # patient column (default: case_id / patient_id / patient when present)
    tile_size: int = 256
    magnification: float = 20.0
    stride: int | None = None
    min_tissue: float = 0.5
    synthetic: dict[str, Any] | None = None  # {"kind": ..., generator parameters}

    @property
    def level(self) -> str:
        """'tiles' or 'slides': what tasks on it see."""
        if self.kind == "synthetic":
            return "tiles" if self.synthetic["kind"] == "tiles" else "slides"
        return self.kind


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str
    dataset: str
    metrics: tuple[str, ...]
    folds: int | None  # None: the dataset's split column, else 5 folds
    params: dict[str, Any]

    @property
    def metric(self) -> str:
        return self.metrics[0]

    def protocol(self, seed: int) -> dict[str, Any]:
        """What decides the predictions (not the metrics: those are computed by the report)."""
        return {"type": self.type, "dataset": self.dataset, "folds": self.folds, "seed": seed, **self.params}


@dataclasses.dataclass(frozen=True)
class Suite:
    path: Path
    name: str
    seed: int
    encoders: dict[str, EncoderSpec]
    datasets: dict[str, DatasetSpec]
    tasks: dict[str, TaskSpec]

    @property
    def synthetic(self) -> bool:
        return any(e.synthetic is not None for e in self.encoders.values())


# ------------------------------------------------------------------------------------------------ loading


class _Fields:
    """Reads one table, naming `file: where.key` in every error, and refuses keys nobody read."""

    def __init__(self, file: Path, where: str, table: Any):
        if not isinstance(table, dict):
            raise SuiteError(f"{file}: {where}: expected a table, got {type(table).__name__}")
        self.file, self.where, self.table, self.seen = file, where, table, set()

    def error(self, key: str, msg: str) -> SuiteError:
        return SuiteError(f"{self.file}: {self.where}.{key}: {msg}" if self.where else f"{self.file}: {key}: {msg}")

    def get(self, key: str, kind, default=None, choices=None):
        self.seen.add(key)
        if key not in self.table:
            return default
        v = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if float in kinds and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            names = " or ".join({int: "an integer", float: "a number", str: "a string", list: "a list",
                                 dict: "a table", bool: "true/false"}[k] for k in kinds)
            raise self.error(key, f"expected {names}, got {v!r}")
        if choices is not None and v not in choices:
            raise self.error(key, f"must be one of {list(choices)}, got {v!r}")
        return v

    def path(self, key: str, base: Path) -> str | None:
        v = self.get(key, str)
        if v is None:
            return None
        if "://" in v:  # a bucket URL (gs://): taken as it is
            return v
        p = Path(os.path.expanduser(v))
        return str(p if p.is_absolute() else (base / p))

    def done(self) -> None:
        if extra := sorted(set(self.table) - self.seen):
            raise self.error(extra[0], f"unknown field; allowed here: {sorted(self.seen)}")


def _encoder(file: Path, name: str, table: dict) -> EncoderSpec:
    f = _Fields(file, f"encoders.{name}", table)
    base = file.parent
    spec = EncoderSpec(
        name=name, bundle=f.path("bundle", base), step=f.get("step", int), weights=f.path("weights", base),
        convert=f.get("convert", str, "vit", CONVERTERS), arch=f.get("arch", str), num_heads=f.get("num_heads", int),
        synthetic=f.get("synthetic", float), seed=f.get("seed", int, 0), output=f.get("output", str),
        dtype=f.get("dtype", str, "float32", ("float32", "bfloat16")), batch_size=f.get("batch_size", int, 64))
    f.done()
    given = [k for k in ("bundle", "weights", "synthetic") if getattr(spec, k) is not None]
    if len(given) != 1:
        raise f.error("bundle", f"give exactly one of bundle / weights / synthetic (got {given or 'none'})")
    if spec.batch_size < 1:
        raise f.error("batch_size", f"must be >= 1, got {spec.batch_size}")
    if (spec.arch or spec.num_heads) and (spec.weights is None or spec.convert != "vit"):
        raise f.error("arch" if spec.arch else "num_heads", "only for weights converted with convert = \"vit\"")
    return spec


def _dataset(file: Path, name: str, table: dict) -> DatasetSpec:
    f = _Fields(file, f"datasets.{name}", table)
    base = file.parent
    synth = f.get("synthetic", str, None, SYNTHETIC_KINDS)
    common = dict(patient=f.get("patient", str), tile_size=f.get("tile_size", int, 256),
                  magnification=f.get("magnification", float, 20.0), stride=f.get("stride", int),
                  min_tissue=f.get("min_tissue", float, 0.5))
    if synth is not None:
        params = dict(SYNTHETIC_DEFAULTS[synth])
        for k, default in SYNTHETIC_DEFAULTS[synth].items():
            params[k] = f.get(k, type(default), default)
        if synth == "tiles" and params["classes"] < 2:
            raise f.error("classes", "needs >= 2")
        if params["patients"] > params["n"] or params["patients"] < 2:
            raise f.error("patients", f"must be in [2, n = {params['n']}]")
        f.done()
        return DatasetSpec(name, "synthetic", synthetic={"kind": synth, **params}, **common)
    spec = DatasetSpec(name, "tiles", tiles=f.path("tiles", base), csv=f.path("csv", base),
                       slides=f.path("slides", base), labels=f.path("labels", base), **common)
    f.done()
    if spec.slides is not None:
        if spec.tiles or spec.csv:
            raise f.error("slides", "a dataset is either slides (+ labels) or tiles / csv, not both")
        if spec.labels is None:
            raise f.error("labels", "a slide dataset needs a label CSV (slide_id,label or slide_id,time,event)")
        spec = dataclasses.replace(spec, kind="slides")
    elif (spec.tiles is None) == (spec.csv is None):
        raise f.error("tiles", "give one of tiles (a folder) / csv (path,label[,patient][,split]) / slides / "
                               "synthetic")
    for key in ("tiles", "csv", "slides", "labels"):
        p = getattr(spec, key)
        if p is not None and not Path(p).exists():
            raise f.error(key, f"{p}: no such file or folder")
    return spec


def _task(file: Path, name: str, table: dict, datasets: dict[str, DatasetSpec]) -> TaskSpec:
    f = _Fields(file, f"tasks.{name}", table)
    ttype = f.get("type", str, None, TASK_TYPES)
    if ttype is None:
        raise f.error("type", f"missing; one of {list(TASK_TYPES)}")
    dataset = f.get("dataset", str)
    if dataset not in datasets:
        raise f.error("dataset", f"{dataset!r} is not a dataset of this suite ({sorted(datasets)})")
    ds = datasets[dataset]
    allowed = CLASS_METRICS if ttype in ("knn", "linear", "fewshot", "mil") else (
        ("c_index",) if ttype == "survival" else TEXT_METRICS.get(ttype, RETRIEVAL_METRICS))
    metrics = f.get("metrics", list, list(DEFAULT_METRICS[ttype]))
    if not metrics or any(m not in allowed for m in metrics):
        raise f.error("metrics", f"a non-empty list from {list(allowed)}, got {metrics}")
    folds = f.get("folds", int)
    if folds is not None and folds < 2:
        raise f.error("folds", f"must be >= 2, got {folds}")
    params = {}
    for k, default in TASK_PARAMS[ttype].items():
        kind = (float,) if isinstance(default, float) else type(default)
        params[k] = f.get(k, kind, default)
    f.done()
    need = "tiles" if ttype in TILE_TASKS or ttype == "vqa" else "slides"
    if ds.level != need:
        raise f.error("dataset", f"a {ttype} task needs a {need} dataset; {dataset!r} has {ds.level}")
    synth_kind = ds.synthetic["kind"] if ds.synthetic else None
    if ttype == "survival" and synth_kind in ("slides", "reports") or ttype == "mil" and synth_kind == "survival":
        raise f.error("dataset", f"synthetic {synth_kind} data cannot feed a {ttype} task")
    text_kind = "tiles" if ttype == "vqa" else "reports"
    if ttype in TEXT_TASKS and synth_kind != text_kind or ttype not in TEXT_TASKS and synth_kind == "reports":
        raise f.error("dataset", f"a {ttype} task cannot run on {dataset!r}: text tasks run on synthetic "
                                 f"datasets here (report / slide_vqa: \"reports\", vqa: \"tiles\"; real reports "
                                 f"and questions: gpfm-eval report / vqa)")
    if ttype == "mil" and params["model"] not in ("abmil", "transmil", "mean"):
        raise f.error("model", f"one of abmil / transmil / mean, got {params['model']!r}")
    if ttype == "survival" and params["loss"] not in ("nll_surv", "cox"):
        raise f.error("loss", f"nll_surv or cox, got {params['loss']!r}")
    if ttype == "fewshot" and (params["shots"] < 1 or params["episodes"] < 1):
        raise f.error("shots", "shots and episodes must be >= 1")
    return TaskSpec(name, ttype, dataset, tuple(metrics), folds, params)


def load_suite(path: str | os.PathLike) -> Suite:
    """Parses and checks a suite file; raises SuiteError naming the file and field."""
    file = Path(path).absolute()
    if not file.is_file():
        raise SuiteError(f"{file}: no such suite file")
    try:
        raw = tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SuiteError(f"{file}: not valid TOML: {e}") from None
    top = _Fields(file, "", raw)
    name = top.get("name", str, file.stem)
    seed = top.get("seed", int, 0)
    sections = {k: top.get(k, dict, {}) for k in ("encoders", "datasets", "tasks")}
    top.done()
    for section, table in sections.items():
        for key in table:
            if not NAME.match(key):
                raise SuiteError(f"{file}: {section}.{key}: names are letters, digits and _ . + - (no spaces)")
    encoders = {n: _encoder(file, n, t) for n, t in sections["encoders"].items()}
    datasets = {n: _dataset(file, n, t) for n, t in sections["datasets"].items()}
    tasks = {n: _task(file, n, t, datasets) for n, t in sections["tasks"].items()}
    for section, table in sections.items():
        if not table:
            raise SuiteError(f"{file}: [{section}]: the suite declares no {section}")
    synth_enc = sorted(n for n, e in encoders.items() if e.synthetic is not None)
    synth_ds = sorted(n for n, d in datasets.items() if d.kind == "synthetic")
    if synth_enc and len(synth_enc) != len(encoders) or synth_ds and len(synth_ds) != len(datasets) or \
            bool(synth_enc) != bool(synth_ds):
        raise SuiteError(f"{file}: synthetic encoders ({synth_enc}) and synthetic datasets ({synth_ds}) only run "
                         f"with each other: make every encoder and dataset synthetic, or none")
    if len(encoders) < 2:
        raise SuiteError(f"{file}: [encoders]: a ranking needs at least two encoders")
    unused = sorted(set(datasets) - {t.dataset for t in tasks.values()})
    if unused:
        raise SuiteError(f"{file}: datasets.{unused[0]}: no task uses this dataset")
    return Suite(file, name, seed, encoders, datasets, tasks)
