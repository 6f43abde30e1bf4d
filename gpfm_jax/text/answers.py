"""VQA answer normalisation and accuracy, as MUMC scores PathVQA.

MUMC (pengfeiliHEU/MUMC, vqaTools/vqaEval.py) lower-cases both answers, deletes the characters , . ' ! ? " ( ) * # :
; ~, spells "x ray" / "x-ray" as "xray" and " - " as "-", then counts a prediction right when it equals the ground
truth — or, in MUMC's own code, when it is any substring of the ground truth ("no" is then right for "normal"). The
default here is the exact match the paper's text describes (`contains=False`); `contains=True` reproduces MUMC's
published numbers. Accuracy is reported overall, on closed (yes/no) questions and on open ones.
"""

from __future__ import annotations

import re

import numpy as np

_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
CLOSED_TYPES = ("closed", "yes/no", "yes_no", "yesno")  # PathVQA / VQA-RAD / VQAv2 spellings of a yes/no question


def normalize_answer(answer) -> str:
    """MUMC's `pre_answer`."""
    text = _PUNCT.sub("", str(answer).lower()).replace(" \t", " ")
    return text.replace("x ray", "xray").replace("x-ray", "xray").replace(" - ", "-")


def clean_question(question: str, max_words: int = 30) -> str:
    """MUMC's `pre_question`: the answer punctuation deleted, a few PathVQA spellings unified, at most
    `max_words` words (MUMC allows 30 in training and 50 at test time)."""
    q = _PUNCT.sub("", str(question).lower()).replace(" \t", " ").replace("is/are", "is").replace("near/in", "in")
    q = q.replace(">", "more than ").replace("-yes/no", "").replace("x ray", "xray").replace("x-ray", "xray")
    return " ".join(q.rstrip(" ").split(" ")[:max_words])


def is_closed(answer_type: str) -> bool:
    return str(answer_type).strip().lower() in CLOSED_TYPES


def answer_correct(pred: list, truth: list, contains: bool = False) -> np.ndarray:
    """float [N]: 1 where the normalised prediction equals the normalised truth (or, with `contains`, is a
    substring of it, as MUMC's evaluation)."""
    out = []
    for p, t in zip(pred, truth, strict=True):
        p, t = normalize_answer(p), normalize_answer(t)
        out.append(float(p == t or (contains and p in t)))
    return np.asarray(out, np.float64)


def vqa_accuracy(correct: np.ndarray, closed: np.ndarray, w=None) -> dict[str, np.ndarray]:
    """Overall / closed / open accuracy from per-question correctness under weights (None, [N] or [B, N]); a
    category without weight is nan."""
    ww = np.ones((1, len(correct))) if w is None else np.atleast_2d(np.asarray(w, np.float64))
    closed = np.asarray(closed, bool)
    out = {}
    for name, sel in (("accuracy", np.ones_like(closed)), ("closed_accuracy", closed), ("open_accuracy", ~closed)):
        den = ww @ sel.astype(np.float64)
        num = ww @ (correct * sel)
        val = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        out[name] = val[0] if w is None or np.ndim(w) == 1 else val
    return out
