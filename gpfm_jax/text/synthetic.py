"""Synthetic text tasks with a known answer, for tests, the example benchmark suite and tools/bench_textgen.py.

Every slide has a hidden case: a carcinoma type (ductal / lobular / mucinous), a grade (1-3), margins (clear /
involved) and tumour presence. Its tiles are Gaussian noise, and a few tiles of each slide carry a planted
signature vector for each attribute (fixed random directions, scaled by `signal`). The report is a template over the
attributes ("lobular carcinoma , grade 2 , margins clear ."), and the questions are "is there tumor in the slide"
(yes / no) and "what type of carcinoma is it" (the type), both with choices. `shuffle=True` permutes the feature
files among the slides: the same task with the link between features and text cut, whose best score is the prior.
Files are written in the reference formats (gpfm-extract slide files, HistGen annotation JSON, WsiVQA_{split}.json).
"""

from __future__ import annotations

import json

import h5py
import numpy as np
from etils import epath

TYPES = ("ductal", "lobular", "mucinous")
MARGINS = ("clear", "involved")


def _cases(n: int, rng) -> list[dict]:
    return [{"type": int(rng.integers(3)), "grade": int(rng.integers(1, 4)), "margin": int(rng.integers(2)),
             "tumor": bool(rng.random() < 0.5)} for _ in range(n)]


def report_text(c: dict) -> str:
    if not c["tumor"]:
        return "benign tissue , no tumor seen ."
    return f"{TYPES[c['type']]} carcinoma , grade {c['grade']} , margins {MARGINS[c['margin']]} ."


def questions(slide: str, c: dict) -> list[dict]:
    qs = [{"Id": slide, "Question": "is there tumor in the slide?", "Choice": ["yes", "no"],
           "Answer": "yes" if c["tumor"] else "no"}]
    if c["tumor"]:
        qs.append({"Id": slide, "Question": "what type of carcinoma is it?", "Choice": list(TYPES),
                   "Answer": TYPES[c["type"]]})
    return qs


def slide_features(c: dict, directions: np.ndarray, tiles: int, signal: float, rng) -> np.ndarray:
    """f32 [tiles, D]: noise, plus planted signatures on a few tiles (tumour tiles carry type / grade / margin)."""
    x = rng.normal(size=(tiles, directions.shape[1])).astype(np.float32)
    rows = rng.choice(tiles, min(tiles, 4), replace=False)
    if c["tumor"]:
        sig = directions[0] + directions[1 + c["type"]] + directions[4 + c["grade"] - 1] + directions[7 + c["margin"]]
        x[rows] += signal * sig
    else:
        x[rows] += signal * directions[9]
    return x


def make_slides(root, num_slides: int = 60, dim: int = 16, tiles=(6, 20), signal: float = 3.0, seed: int = 0,
                shuffle: bool = False, encoder_noise: float = 0.0) -> tuple[list[str], list[dict]]:
    """Writes `root/features/<slide>.h5` and returns (slide ids, cases). `encoder_noise` adds noise to the planted
    features (a worse "encoder" of the same slides, for graded-encoder rankings)."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(dim, dim)))[0].T[:10].astype(np.float32)
    cases = _cases(num_slides, rng)
    slides = [f"SYN-{i:04d}" for i in range(num_slides)]
    feats = [slide_features(c, directions, int(rng.integers(*tiles)), signal, rng) for c in cases]
    if encoder_noise:
        noise_rng = np.random.default_rng(seed + 1)
        feats = [f + encoder_noise * noise_rng.normal(size=f.shape).astype(np.float32) for f in feats]
    if shuffle:
        feats = [feats[i] for i in np.random.default_rng(seed + 2).permutation(num_slides)]
    out = epath.Path(root) / "features"
    out.mkdir(parents=True, exist_ok=True)
    for s, f in zip(slides, feats):
        with h5py.File(str(out / f"{s}.h5"), "w") as h5:
            h5["features"] = f
            h5["coords"] = np.stack([np.arange(len(f)), np.zeros(len(f))], 1).astype(np.int64) * 224
    return slides, cases


def _split_of(n: int) -> dict[str, slice]:
    a, b = int(round(0.7 * n)), int(round(0.8 * n))  # HistGen's 7:1:2
    return {"train": slice(0, a), "val": slice(a, b), "test": slice(b, n)}


def make_report_task(root, **kw) -> dict[str, str]:
    """Slide files + HistGen annotation JSON; returns the paths gpfm-eval report needs."""
    slides, cases = make_slides(root, **kw)
    ann = {s: [{"id": slides[i], "report": report_text(cases[i])} for i in range(len(slides))[sl]]
           for s, sl in _split_of(len(slides)).items()}
    path = epath.Path(root) / "annotation.json"
    path.write_text(json.dumps(ann))
    return {"features": str(epath.Path(root) / "features"), "annotations": str(path)}


def make_vqa_task(root, **kw) -> dict[str, str]:
    """Slide files + WsiVQA_{train,val,test}.json; returns the paths gpfm-eval vqa --format wsivqa needs."""
    slides, cases = make_slides(root, **kw)
    paths = {"features": str(epath.Path(root) / "features")}
    for s, sl in _split_of(len(slides)).items():
        qs = [q for i in range(len(slides))[sl] for q in questions(slides[i], cases[i])]
        p = epath.Path(root) / f"WsiVQA_{s}.json"
        p.write_text(json.dumps(qs))
        paths[s] = str(p)
    return paths


def make_tile_vqa_task(root, num_images: int = 300, dim: int = 16, signal: float = 3.0, seed: int = 0,
                       shuffle: bool = False) -> dict[str, str]:
    """A tile-feature file (gpfm-extract's `features` + `paths`), MUMC-format PathVQA JSON per split and an answer
    list: a yes/no (closed) question per image and a "what type" (open) question per tumour image."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(dim, dim)))[0].T[:10].astype(np.float32)
    cases = _cases(num_images, rng)
    feats = np.stack([slide_features(c, directions, 1, signal, rng)[0] for c in cases])
    if shuffle:
        feats = feats[np.random.default_rng(seed + 2).permutation(num_images)]
    root = epath.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"img_{i:04d}.jpg" for i in range(num_images)]
    with h5py.File(str(root / "tiles.h5"), "w") as h5:
        h5["features"] = feats
        h5["paths"] = np.array([f"images/{n}" for n in names], dtype=h5py.string_dtype())
    paths = {"features": str(root / "tiles.h5")}
    qid = 0
    for s, sl in _split_of(num_images).items():
        qs = []
        for i in range(num_images)[sl]:
            c = cases[i]
            qs.append({"qid": qid, "image_name": names[i], "question": "Is there tumor in the image?",
                       "answer": "yes" if c["tumor"] else "no", "answer_type": "CLOSED"})
            qid += 1
            if c["tumor"]:
                qs.append({"qid": qid, "image_name": names[i], "question": "What type of carcinoma is it?",
                           "answer": TYPES[c["type"]], "answer_type": "OPEN"})
                qid += 1
        (root / f"pathvqa_{s}.json").write_text(json.dumps(qs))
        paths[s] = str(root / f"pathvqa_{s}.json")
    (root / "answer_list.json").write_text(json.dumps(["yes", "no", *TYPES, "normal"]))
    paths["answer_list"] = str(root / "answer_list.json")
    return paths
