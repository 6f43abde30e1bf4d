"""Synthetic encoders and datasets whose true ranking is known: the proof that gpfm-bench ranks correctly.

A synthetic dataset fixes the truth (labels, patients, survival times, which tiles are informative); a synthetic
encoder with signal s "extracts" features = s * (the informative direction of each item) + noise, with its own
noise stream (its `seed`). A larger s is a better encoder on every task type, so the true order of encoders is the
order of their signals; two encoders with the same signal and seed are the same encoder (identical features,
hence one content key); the same signal with another seed is an equally good but different encoder.

- `tiles` (kNN, linear probe, few-shot, retrieval): n tiles of `patients` patients (tile i belongs to patient
  i mod P), class c uniform over `classes`; feature = s * mu_c + b_patient + N(0, I), mu_c unit vectors, b_patient
  ~ N(0, 0.25 I) a patient effect shared by that patient's tiles (so tiles of one patient are correlated, as in
  real cohorts, and resampling patients matters).
- `slides` (MIL classification): n slides of 16-48 tiles, half positive; a positive slide hides a third of its
  tiles shifted by 0.75 s along a fixed direction u; every other tile is N(0, I).
- `survival`: slide risk z ~ N(0, 1), event time T ~ Exponential(mean 10 exp(-z)); a `censoring` fraction of the
  slides is censored at T * U(0, 1); every tile carries 0.3 s z u + N(0, I).
- `reports` (report generation and slide VQA): n slides of 8-24 tiles with hidden cases (carcinoma type, grade,
  margins, tumour presence; `gpfm_jax.text.synthetic`), each slide's report a template over its case and its
  questions yes/no + "what type"; a third of a tumour slide's tiles carry 0.75 s times the sum of its attributes'
  directions (benign slides: one direction). Splits 7:1:2 by slide order.
The constants keep signals of ~0.5-3 between chance and the ceiling on every task type, so graded encoders stay
distinguishable (none saturates at AUC 1).

Features are written in gpfm-extract's file layouts (tiles: `features`, `paths`; slides: `features`, `coords`), so
everything after extraction runs exactly as for real encoders.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

GENERATOR_VERSION = 1
_KIND = {"tiles": 1, "slides": 2, "survival": 3, "reports": 4}


@dataclasses.dataclass
class Truth:
    """What a synthetic dataset is: item ids, patients and labels (the same for every encoder)."""

    ids: list[str]  # tile paths or slide ids
    patients: list[str]
    labels: list[str] | None = None  # classification
    time: np.ndarray | None = None  # survival
    event: np.ndarray | None = None
    sizes: np.ndarray | None = None  # tiles per slide
    z: np.ndarray | None = None  # the latent per item (class index, or survival risk)


def _rng(params: dict[str, Any], *more: int) -> np.random.Generator:
    return np.random.default_rng([GENERATOR_VERSION, _KIND[params["kind"]], int(params["seed"]), *more])


def truth(params: dict[str, Any]) -> Truth:
    kind, n, p = params["kind"], int(params["n"]), int(params["patients"])
    rng = _rng(params, 0)
    if kind == "tiles":
        y = rng.integers(0, int(params["classes"]), n)
        pat = np.arange(n) % p
        return Truth([f"patient{q:04d}/tile{i:05d}.png" for i, q in enumerate(pat)], [f"patient{q:04d}" for q in pat],
                     labels=[f"class{c}" for c in y], z=y)
    sizes = rng.integers(int(params["min_tiles"]), int(params["max_tiles"]) + 1, n)
    ids = [f"slide{i:04d}" for i in range(n)]
    patients = [f"patient{i % p:04d}" for i in range(n)]
    if kind == "reports":
        from gpfm_jax.text import synthetic as text_synthetic

        cases = text_synthetic._cases(n, rng)
        return Truth(ids, patients, labels=[text_synthetic.report_text(c) for c in cases], sizes=sizes,
                     z=np.asarray([[c["tumor"], c["type"], c["grade"], c["margin"]] for c in cases]))
    if kind == "slides":
        y = rng.permutation(np.arange(n) % 2)
        return Truth(ids, patients, labels=["positive" if v else "negative" for v in y], sizes=sizes, z=y)
    z = rng.standard_normal(n)
    t = rng.exponential(10.0 * np.exp(-z))
    censored = rng.random(n) < float(params["censoring"])
    t = np.where(censored, t * rng.random(n), t)
    event = ~censored
    if not event.any():
        event[np.argmax(t)] = True
    return Truth(ids, patients, time=np.round(t, 4) + 1e-3, event=event, sizes=sizes, z=z)


def _directions(params: dict[str, Any], k: int) -> np.ndarray:
    d = _rng(params, 1).standard_normal((k, int(params["dim"])))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def tile_features(params: dict[str, Any], signal: float, seed: int) -> np.ndarray:
    """float32 [n, dim] features of every tile for an encoder with this signal and noise seed."""
    t = truth(params)
    dim, p = int(params["dim"]), int(params["patients"])
    mu = _directions(params, int(params["classes"]))
    patient_effect = 0.5 * _rng(params, 2).standard_normal((p, dim))
    noise = _rng(params, 3, int(seed)).standard_normal((len(t.ids), dim))
    pat = np.arange(len(t.ids)) % p
    return (signal * mu[t.z] + patient_effect[pat] + noise).astype(np.float32)


def slide_features(params: dict[str, Any], signal: float, seed: int, index: int) -> np.ndarray:
    """float32 [tiles, dim] features of slide `index`."""
    t = truth(params)
    m, dim = int(t.sizes[index]), int(params["dim"])
    u = _directions(params, 1)[0]
    x = _rng(params, 3, int(seed), index).standard_normal((m, dim))
    if params["kind"] == "reports":
        tumor, typ, grade, margin = (int(v) for v in t.z[index])
        d = _directions(params, 10)
        sig = d[0] + d[1 + typ] + d[4 + grade - 1] + d[7 + margin] if tumor else d[9]
        key = _rng(params, 4, index).choice(m, max(1, m // 3), replace=False)
        x[key] += 0.75 * signal * sig
    elif params["kind"] == "slides":
        if t.z[index]:
            key = _rng(params, 4, index).choice(m, max(1, m // 3), replace=False)  # the truth: same for every encoder
            x[key] += 0.75 * signal * u
    else:
        x += 0.3 * signal * t.z[index] * u
    return x.astype(np.float32)


def slide_coords(m: int, span: int = 256) -> np.ndarray:
    """Level-0 (x, y) of m tiles on a square grid (the slide layout wants coords)."""
    side = int(np.ceil(np.sqrt(m)))
    i = np.arange(m)
    return np.stack([(i % side) * span, (i // side) * span], 1).astype(np.int64)


def label_rows(params: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the label CSV of a synthetic slide dataset (bags.load_table reads it)."""
    t = truth(params)
    if params["kind"] in ("slides", "reports"):  # reports: the label is the report text
        return ["slide_id", "label", "case_id"], [[i, lab, p] for i, lab, p in zip(t.ids, t.labels, t.patients)]
    return (["slide_id", "time", "event", "case_id"],
            [[i, f"{tm:.6f}", str(int(e)), p] for i, tm, e, p in zip(t.ids, t.time, t.event, t.patients)])


def text_annotations(params: dict[str, Any], folder) -> dict[str, str]:
    """Writes a `reports` dataset's HistGen annotation JSON and WsiVQA_{split}.json into `folder` (7:1:2 by slide
    order) and returns their paths: {annotations, train, val, test}."""
    import json
    from pathlib import Path

    from gpfm_jax.text import synthetic as text_synthetic

    t = truth(params)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(t.ids)
    cut = {"train": range(0, int(round(0.7 * n))), "val": range(int(round(0.7 * n)), int(round(0.8 * n))),
           "test": range(int(round(0.8 * n)), n)}
    cases = [dict(zip(("tumor", "type", "grade", "margin"), (bool(z[0]), int(z[1]), int(z[2]), int(z[3]))))
             for z in t.z]
    out = {"annotations": str(folder / "annotation.json")}
    (folder / "annotation.json").write_text(json.dumps(
        {s: [{"id": t.ids[i], "report": t.labels[i]} for i in r] for s, r in cut.items()}))
    for s, r in cut.items():
        (folder / f"WsiVQA_{s}.json").write_text(json.dumps(
            [q for i in r for q in text_synthetic.questions(t.ids[i], cases[i])]))
        out[s] = str(folder / f"WsiVQA_{s}.json")
    return out


def tile_questions(params: dict[str, Any], folder) -> dict[str, str]:
    """For a `tiles` dataset: PathVQA-format questions per tile ("is this tile class0?" closed, "which class is this
    tile?" open), split 7:1:2 by patient, and the answer list; returns {train, val, test, answer_list}."""
    import json
    from pathlib import Path

    t = truth(params)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = int(params["patients"])
    cut = [int(round(0.7 * p)), int(round(0.8 * p))]
    split_of = lambda q: "train" if q < cut[0] else ("val" if q < cut[1] else "test")  # noqa: E731
    qs: dict[str, list] = {"train": [], "val": [], "test": []}
    for i, (tile, label) in enumerate(zip(t.ids, t.labels)):
        s = split_of(i % p)
        name = tile.rsplit("/", 1)[-1]
        qs[s].append({"qid": 2 * i, "image_name": name, "question": "is this tile class0?",
                      "answer": "yes" if label == "class0" else "no", "answer_type": "CLOSED"})
        qs[s].append({"qid": 2 * i + 1, "image_name": name, "question": "which class is this tile?",
                      "answer": label, "answer_type": "OPEN"})
    out = {}
    for s, v in qs.items():
        (folder / f"pathvqa_{s}.json").write_text(json.dumps(v))
        out[s] = str(folder / f"pathvqa_{s}.json")
    (folder / "answers.json").write_text(json.dumps(["yes", "no", *sorted(set(t.labels))]))
    out["answer_list"] = str(folder / "answers.json")
    return out
