"""Readers of the text-task annotation files, in the formats the reference repositories ship.

- HistGen (report generation): one JSON object {"train": [...], "val": [...], "test": [...]}, each entry
  {"id": slide id (the feature file's stem), "report": text, ...}.
- WSI-VQA (slide VQA): one JSON list per split, `WsiVQA_{train,val,test}.json`, entries
  {"Id": TCGA case id (12 characters), "Question": ..., "Answer": ..., "Choice": [4 strings] (optional)}; a slide
  matches a case when its id starts with the case id, as W2T pairs slides to cases.
- PathVQA as MUMC reads it: one JSON list per split, entries {"qid", "image_name" (or "image"), "question",
  "answer", "answer_type"} plus a JSON list of candidate answers (`answer_trainval_list.json`).

Malformed files are errors naming the file, the entry and the field; data that is merely unusable (an empty
report) is left out with a warning naming it, as gpfm-eval mil does with unlabelled slides.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from etils import epath

from gpfm_jax.text.tokenize import clean_report

log = logging.getLogger("gpfm_jax.evaluate")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Report:
    slide: str
    text: str


@dataclasses.dataclass(frozen=True)
class Question:
    image: str  # slide / case id (WSI-VQA) or image name (PathVQA)
    question: str
    answer: str
    answer_type: str = ""  # PathVQA's closed / open ("yes/no" counts as closed)
    choices: tuple[str, ...] = ()  # WSI-VQA's multiple choice
    qid: str = ""


def _load(path) -> object:
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _field(path, where: str, entry, name: str, *alternatives: str) -> str:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} is not an object")
    for key in (name, *alternatives):
        if key in entry and entry[key] is not None:
            return str(entry[key])
    names = " or ".join(repr(k) for k in (name, *alternatives))
    raise ValueError(f"{path}: {where} has no {names} field (has {sorted(entry)})")


def read_histgen(path) -> dict[str, list[Report]]:
    """{split: [Report]} of a HistGen annotation JSON; reports that clean to nothing are left out (warned)."""
    ann = _load(path)
    if not isinstance(ann, dict) or not all(s in ann for s in SPLITS):
        got = sorted(ann) if isinstance(ann, dict) else type(ann).__name__
        raise ValueError(f"{path}: needs an object with 'train', 'val' and 'test' lists, got {got}")
    out = {}
    for split in SPLITS:
        reports, empty = [], []
        for i, entry in enumerate(ann[split]):
            where = f"{split}[{i}]"
            slide = _field(path, where, entry, "id")
            text = _field(path, where, entry, "report")
            if clean_report(text).replace(".", "").strip() == "":
                empty.append(slide)
                continue
            reports.append(Report(slide, text))
        if empty:
            log.warning("%s: %d %s reports are empty and left out: %s", path, len(empty), split, ", ".join(empty))
        out[split] = reports
    return out


def _load_list(path) -> list:
    data = _load(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: needs a JSON list of questions, got {type(data).__name__}")
    return data


def read_wsivqa(path) -> list[Question]:
    """Questions of one WSI-VQA split file."""
    data = _load_list(path)
    out = []
    for i, e in enumerate(data):
        where = f"entry {i}"
        choices = e.get("Choice") if isinstance(e, dict) else None
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{path}: {where}: 'Choice' must be a list of strings")
        out.append(Question(_field(path, where, e, "Id"), _field(path, where, e, "Question"),
                            _field(path, where, e, "Answer"), "", tuple(choices or ())))
    return out


def read_pathvqa(path) -> list[Question]:
    """Questions of one MUMC-format PathVQA split file; every question needs an answer type (closed / open)."""
    data = _load_list(path)
    out = []
    for i, e in enumerate(data):
        where = f"entry {i}" + (f" (qid {e['qid']})" if isinstance(e, dict) and "qid" in e else "")
        out.append(Question(_field(path, where, e, "image_name", "image"), _field(path, where, e, "question"),
                            _field(path, where, e, "answer"), _field(path, where, e, "answer_type"), (),
                            str(e.get("qid", i))))
    return out


def read_answer_list(path) -> list[str]:
    data = _load(path)
    if not isinstance(data, list) or not data or not all(isinstance(a, (str, int, float)) for a in data):
        raise ValueError(f"{path}: needs a non-empty JSON list of answers")
    return [str(a) for a in data]


def match_slides(keys: list[str], slides: dict[str, object], prefix: bool = False) -> tuple[dict, list[str]]:
    """{key: slide} for annotation keys with a feature file (exact stem, or with `prefix` the first slide whose id
    starts with the key, as W2T pairs TCGA case ids with slide files), and the keys left without one."""
    found, missing = {}, []
    names = sorted(slides)
    for k in dict.fromkeys(keys):
        if k in slides:
            found[k] = k
        elif prefix and (hits := [n for n in names if n.startswith(k)]):
            found[k] = hits[0]
        else:
            missing.append(k)
    return found, missing
