"""Caption and VQA metrics against pycocoevalcap (BLEU, ROUGE-L, CIDEr-D, METEOR), nltk and sacrebleu, on explicit
bootstrap resamples, and on hand-computed cases."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import require

from gpfm_jax.text import answers, metrics

WORDS = ("invasive ductal carcinoma grade 1 2 3 margins clear involved lymph node negative positive tumor size cm "
         "the of a with no evidence necrosis mitotic count high low . ,").split()
TEMPLATES = [
    "invasive ductal carcinoma , grade {g} . margins {m} . {n} of {k} lymph nodes positive .",
    "the tumor measures {s} cm . {m} margins . no evidence of necrosis .",
    "lobular carcinoma in situ , grade {g} . mitotic count {h} .",
]


def _real_looking(rng, n):
    def one():
        t = TEMPLATES[rng.integers(len(TEMPLATES))]
        return t.format(g=rng.integers(1, 4), m=rng.choice(["clear", "involved"]), n=rng.integers(0, 5),
                        k=rng.integers(5, 12), s=rng.integers(1, 9), h=rng.choice(["high", "low"])).split()

    return [one() for _ in range(n)], [[one() for _ in range(rng.integers(1, 3))] for _ in range(n)]


def _random(rng, n):
    sent = lambda lo: list(rng.choice(WORDS, rng.integers(lo, 25)))  # noqa: E731
    return [sent(0) for _ in range(n)], [[sent(1) for _ in range(rng.integers(1, 4))] for _ in range(n)]


@pytest.fixture(scope="module")
def corpora():
    rng = np.random.default_rng(0)
    hr, rr = _real_looking(rng, 150)
    hx, rx = _random(rng, 150)
    # some hypotheses copied from a reference, so high-order matches occur in the random set too
    for i in range(0, 150, 7):
        hx[i] = list(rx[i][0])
    return {"real": (hr, rr), "random": (hx, rx), "mixed": (hr + hx, rr + rx)}


def _coco(hyps, refs):
    require("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    r, _ = Rouge().compute_score(gts, res)
    c, _ = Cider().compute_score(gts, res)
    return {**{f"bleu_{k + 1}": b[k] for k in range(4)}, "rouge_l": r, "cider_d": c}


@pytest.mark.parametrize("name", ["real", "random", "mixed"])
def test_equal_to_pycocoevalcap(corpora, name):
    hyps, refs = corpora[name]
    ours = metrics.caption_metrics(metrics.text_stats(hyps, refs))
    ref = _coco(hyps, refs)
    for k, v in ref.items():
        assert abs(float(ours[k]) - v) < 1e-6, (k, float(ours[k]), v)


def test_weights_equal_explicit_resamples(corpora):
    """Metric under bootstrap weights [B, N] == pycocoevalcap on the resampled (duplicated) corpus."""
    hyps, refs = corpora["mixed"]
    stats = metrics.text_stats(hyps, refs)
    rng = np.random.default_rng(1)
    draws = rng.integers(0, len(hyps), (3, len(hyps)))
    w = np.stack([np.bincount(d, minlength=len(hyps)) for d in draws]).astype(np.float64)
    ours = metrics.caption_metrics(stats, w)
    for b, d in enumerate(draws):
        ref = _coco([hyps[i] for i in d], [refs[i] for i in d])
        for k, v in ref.items():
            assert abs(float(ours[k][b]) - v) < 1e-6, (b, k, float(ours[k][b]), v)


def test_bleu_equals_nltk_and_sacrebleu(corpora):
    nltk_bleu = require("nltk.translate.bleu_score")
    sacrebleu = require("sacrebleu")
    hyps, refs = corpora["real"]
    ours = metrics.bleu(metrics.text_stats(hyps, refs))
    for k in range(4):
        weights = tuple([1.0 / (k + 1)] * (k + 1))
        assert abs(nltk_bleu.corpus_bleu(refs, hyps, weights=weights) - ours[k]) < 1e-6
    single = [[rs[0]] for rs in refs]  # sacrebleu wants the same number of references per sentence
    ours1 = metrics.bleu(metrics.text_stats(hyps, single))
    sb = sacrebleu.corpus_bleu([" ".join(h) for h in hyps], [[" ".join(rs[0]) for rs in single]],
                               tokenize="none", smooth_method="none", force=True)
    assert abs(sb.score / 100 - ours1[3]) < 1e-6


def test_hand_computed():
    same = [["a", "b", "c", "d", "e"], ["f", "g", "h", "i"]]
    m = metrics.caption_metrics(metrics.text_stats(same, [[s] for s in same]))
    for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert abs(float(m[k]) - 1.0) < 1e-6, k
    assert abs(float(m["cider_d"]) - 10.0) < 1e-9  # cosine 1, no length penalty, x10
    m = metrics.caption_metrics(metrics.text_stats([["a", "b"], ["c"]], [[["x", "y"]], [["z"]]]))
    for k in ("bleu_1", "bleu_4", "rouge_l", "cider_d"):
        assert abs(float(m[k])) < 1e-6, k
    # a b c d vs a b c e: precisions 3/4, 2/3, 1/2, 0; equal lengths (no brevity penalty)
    b = metrics.bleu(metrics.text_stats([list("abcd")], [[list("abce")]]))
    assert np.allclose(b[:3], [0.75, np.sqrt(0.5), 0.25 ** (1 / 3)], atol=1e-6)
    # brevity: hypothesis "a b" against "a b c d": BLEU-1 = 1 * exp(1 - 4/2)
    assert abs(metrics.bleu(metrics.text_stats([["a", "b"]], [[list("abcd")]]))[0] - np.exp(-1.0)) < 1e-6
    # ROUGE-L: LCS 3 of hyp 4 / ref 5 -> P 3/4, R 3/5, F_1.2
    p, r = 0.75, 0.6
    want = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert abs(metrics.rouge_l_sentence(list("axbc"), [list("abycz")]) - want) < 1e-12


def test_lcs_matches_dynamic_programming():
    require("pycocoevalcap")
    from pycocoevalcap.rouge.rouge import my_lcs

    rng = np.random.default_rng(3)
    for _ in range(300):
        a = list(rng.choice(list("abcdef"), rng.integers(0, 70)))
        b = list(rng.choice(list("abcdef"), rng.integers(0, 70)))
        want = my_lcs(a, b) if a and b else 0
        assert metrics.lcs_length(a, b) == want


def test_vqa_accuracy_and_normalisation():
    assert answers.normalize_answer("X-Ray, (left)!") == "xray left"
    assert answers.normalize_answer("Yes.") == "yes"
    pred = ["Yes", "no", "adenocarcinoma", "no", "x ray"]
    truth = ["yes.", "No", "Squamous cell carcinoma", "normal", "X-ray"]
    closed = [answers.is_closed(t) for t in ["CLOSED", "yes/no", "OPEN", "other", "open"]]
    exact = answers.answer_correct(pred, truth)
    assert exact.tolist() == [1, 1, 0, 0, 1]
    assert answers.answer_correct(pred, truth, contains=True).tolist() == [1, 1, 0, 1, 1]  # MUMC: "no" in "normal"
    acc = answers.vqa_accuracy(exact, np.array(closed))
    assert acc["accuracy"] == pytest.approx(0.6) and acc["closed_accuracy"] == 1.0
    assert acc["open_accuracy"] == pytest.approx(1 / 3)
    w = np.array([[0, 0, 2, 1, 0], [1, 1, 1, 1, 1]], np.float64)
    acc_w = answers.vqa_accuracy(exact, np.array(closed), w)
    assert np.isnan(acc_w["closed_accuracy"][0]) and acc_w["accuracy"][0] == 0.0
    assert acc_w["accuracy"][1] == pytest.approx(0.6)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java (pycocoevalcap's METEOR 1.5 jar)")
def test_meteor_through_the_jar():
    require("pycocoevalcap")
    from gpfm_jax.text import meteor

    assert meteor.meteor_unavailable() is None
    hyps = [["invasive", "ductal", "carcinoma", "grade", "2"], ["the", "margins", "are", "clear"]]
    refs = [[list(hyps[0])], [["lymph", "node", "negative"]]]
    score, per = meteor.meteor(hyps, refs)
    assert per[0] > 0.9 and per[1] == 0.0
    assert 0.0 < score < 1.0
