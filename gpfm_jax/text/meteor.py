"""METEOR 1.5 through pycocoevalcap's bundled jar (the only METEOR the report papers use; nltk's needs WordNet data
that cannot be fetched offline). Needs `java` on PATH and pycocoevalcap (the `text` extra); without either the
metric is skipped and the reason says which is missing."""

from __future__ import annotations

import shutil


def meteor_unavailable() -> str | None:
    """None when METEOR can run, else the reason it cannot."""
    if shutil.which("java") is None:
        return "METEOR skipped: no `java` on PATH (pycocoevalcap runs METEOR 1.5 as a Java jar; install a JRE)"
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return "METEOR skipped: pycocoevalcap is not installed (pip install -e \".[text]\")"
    return None


def meteor(hyps: list[list[str]], refs: list[list[list[str]]]) -> tuple[float, list[float]]:
    """(corpus METEOR, per-sentence METEOR). The corpus value is METEOR's own aggregate over the sufficient
    statistics of all sentences, not the mean of the sentence values, so a bootstrap of it would need the jar per
    replicate; gpfm-eval reports it without an interval."""
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
    finally:
        del scorer
    return float(score), [float(s) for s in scores]
