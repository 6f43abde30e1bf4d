"""Caption metrics as pycocoevalcap computes them, written over per-sentence n-gram statistics.

Every corpus metric here is a function of per-sentence statistics computed once (`TextStats`), evaluated under
sentence weights `w` ([N], or [B, N] for B bootstrap replicates at once). A bootstrap resample is a multiset of
sentences, so the metric of a resample equals the metric of the original sentences weighted by how often each was
drawn: corpus BLEU sums weighted clipped-match / guess / length counts, ROUGE-L is a weighted mean of sentence
scores, and CIDEr-D recomputes its document frequencies from weighted reference sets (an image drawn twice counts
twice, exactly as pycocoevalcap would count the duplicated image). Tests compare each against pycocoevalcap on
explicit resamples.

Definitions (pycocoevalcap 1.2, the coco-caption code the report-generation papers use):
- BLEU-n: corpus BLEU, clipped n-gram matches against the max count over references, the reference length of a
  sentence is the closest to the hypothesis length (ties: the shorter), brevity penalty exp(1 - r/c) when c < r, and
  pycocoevalcap's smoothing constants (1e-15 on matches, 1e-9 on guesses), which keep BLEU-4 slightly above 0 when
  no 4-gram matches;
- ROUGE-L: per sentence F(beta = 1.2) of the LCS precision and recall, each maximised over the references
  separately, averaged over sentences (not rouge-score's rougeL F1);
- CIDEr-D: tf-idf n-gram vectors (n = 1..4) with document frequencies over the reference sets, clipped hypothesis
  weights, a Gaussian length penalty (sigma 6) whose "length" is, as in pycocoevalcap, the number of bigrams, x10.

Input is already tokenised: a sentence is a list of tokens (pycocoevalcap splits strings on whitespace; the reports
here come out of `gpfm_jax.text.tokenize`, which is how HistGen scores them too — no PTB tokenizer in between).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import scipy.sparse

Sentence = list  # list[str]
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU constants


def ngrams(tokens: Sentence, n: int = 4) -> collections.Counter:
    """Counts of every 1..n-gram (tuples) of one token list."""
    counts = collections.Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def lcs_length(a: Sentence, b: Sentence) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): one big-int add per token of `b`, so a
    100-token pair costs ~100 operations instead of a 10^4-cell Python table."""
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    mask = (1 << len(a)) - 1
    v = mask
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & mask
    return len(a) - bin(v).count("1")


def rouge_l_sentence(hyp: Sentence, refs: list[Sentence], beta: float = 1.2) -> float:
    """pycocoevalcap's ROUGE-L of one hypothesis: precision and recall maximised over references separately."""
    if not hyp:
        return 0.0
    prec = rec = 0.0
    for ref in refs:
        lcs = lcs_length(ref, hyp)
        prec = max(prec, lcs / len(hyp))
        rec = max(rec, lcs / len(ref) if ref else 0.0)
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + beta**2) * prec * rec / (rec + beta**2 * prec)


@dataclasses.dataclass
class TextStats:
    """Everything the corpus metrics need, per sentence (N hypotheses, each with >= 1 reference)."""

    testlen: np.ndarray  # [N] hypothesis length
    reflen: np.ndarray  # [N] closest reference length
    guess: np.ndarray  # [N, 4] hypothesis n-grams
    correct: np.ndarray  # [N, 4] clipped matches
    rouge_l: np.ndarray  # [N] sentence ROUGE-L
    cider: "CiderLayout"

    @property
    def size(self) -> int:
        return len(self.testlen)


@dataclasses.dataclass
class CiderLayout:
    """Sparse entries of the CIDEr-D computation; `cider_d` needs only these and the weights."""

    num_grams: int
    doc_image: np.ndarray  # [D] image of each (image, n-gram in its references) entry
    doc_gram: np.ndarray  # [D]
    hyp_seg: scipy.sparse.csr_matrix  # [N*4, H] sums hypothesis entries into (image, order)
    hyp_gram: np.ndarray  # [H]
    hyp_tf: np.ndarray  # [H]
    ref_seg: scipy.sparse.csr_matrix  # [P*4, Q] sums reference entries into (pair, order)
    ref_gram: np.ndarray  # [Q]
    ref_tf: np.ndarray  # [Q]
    match_seg: scipy.sparse.csr_matrix  # [P*4, M] sums matched entries into (pair, order)
    match_gram: np.ndarray  # [M]
    match_hyp_tf: np.ndarray  # [M]
    match_ref_tf: np.ndarray  # [M]
    pair_image: np.ndarray  # [P] image of each (image, reference) pair
    pair_penalty: np.ndarray  # [P] exp(-delta^2 / 2 sigma^2)
    refs_per_image: np.ndarray  # [N]


def _segments(rows: list[int], num_rows: int) -> scipy.sparse.csr_matrix:
    cols = np.arange(len(rows))
    return scipy.sparse.csr_matrix((np.ones(len(rows)), (np.asarray(rows, np.int64), cols)),
                                   shape=(num_rows, len(rows)))


def _cider_layout(hyp_counts, ref_counts, n: int = 4, sigma: float = 6.0) -> CiderLayout:
    vocab: dict[tuple, int] = {}

    def gid(g):
        return vocab.setdefault(g, len(vocab))

    doc_image, doc_gram = [], []
    hyp_rows, hyp_gram, hyp_tf = [], [], []
    ref_rows, ref_gram, ref_tf = [], [], []
    m_rows, m_gram, m_htf, m_rtf = [], [], [], []
    pair_image, penalty = [], []
    for i, (hc, rcs) in enumerate(zip(hyp_counts, ref_counts)):
        for g in {g for rc in rcs for g in rc}:
            doc_image.append(i)
            doc_gram.append(gid(g))
        for g, tf in hc.items():
            hyp_rows.append(i * n + len(g) - 1)
            hyp_gram.append(gid(g))
            hyp_tf.append(tf)
        hyp_len = sum(tf for g, tf in hc.items() if len(g) == 2)  # pycocoevalcap's "length": bigram count
        for rc in rcs:
            p = len(pair_image)
            pair_image.append(i)
            ref_len = sum(tf for g, tf in rc.items() if len(g) == 2)
            penalty.append(math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2)))
            for g, tf in rc.items():
                ref_rows.append(p * n + len(g) - 1)
                ref_gram.append(gid(g))
                ref_tf.append(tf)
                if g in hc:
                    m_rows.append(p * n + len(g) - 1)
                    m_gram.append(gid(g))
                    m_htf.append(hc[g])
                    m_rtf.append(tf)
    num_pairs = len(pair_image)
    arr = lambda x, t=np.int64: np.asarray(x, t)  # noqa: E731
    return CiderLayout(
        num_grams=len(vocab), doc_image=arr(doc_image), doc_gram=arr(doc_gram),
        hyp_seg=_segments(hyp_rows, len(hyp_counts) * n), hyp_gram=arr(hyp_gram), hyp_tf=arr(hyp_tf, np.float64),
        ref_seg=_segments(ref_rows, num_pairs * n), ref_gram=arr(ref_gram), ref_tf=arr(ref_tf, np.float64),
        match_seg=_segments(m_rows, num_pairs * n), match_gram=arr(m_gram),
        match_hyp_tf=arr(m_htf, np.float64), match_ref_tf=arr(m_rtf, np.float64),
        pair_image=arr(pair_image), pair_penalty=arr(penalty, np.float64),
        refs_per_image=np.bincount(arr(pair_image), minlength=len(hyp_counts)).astype(np.float64))


def text_stats(hyps: list[Sentence], refs: list[list[Sentence]], n: int = 4) -> TextStats:
    """Per-sentence statistics of hypotheses `hyps[i]` against their references `refs[i]` (token lists)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference sets")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every hypothesis needs at least one reference")
    hyp_counts = [ngrams(h, n) for h in hyps]
    ref_counts = [[ngrams(r, n) for r in rs] for rs in refs]
    testlen = np.array([len(h) for h in hyps], np.float64)
    reflen = np.array([min((abs(len(r) - len(h)), len(r)) for r in rs)[1] for h, rs in zip(hyps, refs)], np.float64)
    guess = np.array([[max(0, len(h) - k + 1) for k in range(1, n + 1)] for h in hyps], np.float64).reshape(-1, n)
    correct = np.zeros((len(hyps), n))
    for i, (hc, rcs) in enumerate(zip(hyp_counts, ref_counts)):
        for g, c in hc.items():
            correct[i, len(g) - 1] += min(c, max(rc.get(g, 0) for rc in rcs))
    rouge = np.array([rouge_l_sentence(h, rs) for h, rs in zip(hyps, refs)], np.float64)
    return TextStats(testlen, reflen, guess, correct, rouge, _cider_layout(hyp_counts, ref_counts, n))


def _weights(stats: TextStats, w) -> np.ndarray:
    return np.ones((1, stats.size)) if w is None else np.atleast_2d(np.asarray(w, np.float64))


def bleu(stats: TextStats, w=None) -> np.ndarray:
    """Corpus BLEU-1..4: [4], or [B, 4] for weights [B, N]."""
    ww = _weights(stats, w)
    correct, guess = ww @ stats.correct, ww @ stats.guess  # [B, 4]
    ratio = (ww @ stats.testlen + _TINY) / (ww @ stats.reflen + _SMALL)  # [B]
    order = np.arange(1, correct.shape[1] + 1)
    out = np.cumprod((correct + _TINY) / (guess + _SMALL), axis=1) ** (1.0 / order)
    bp = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1.0)), 1.0)
    out = out * bp[:, None]
    return out[0] if w is None or np.ndim(w) == 1 else out


def rouge_l(stats: TextStats, w=None) -> np.ndarray:
    """Mean sentence ROUGE-L: scalar, or [B]."""
    ww = _weights(stats, w)
    out = (ww @ stats.rouge_l) / ww.sum(1)
    return out[0] if w is None or np.ndim(w) == 1 else out


def cider_sentences(stats: TextStats, w=None) -> np.ndarray:
    """Per-sentence CIDEr-D [B, N] with document frequencies from the weighted reference sets."""
    lay, ww = stats.cider, _weights(stats, w)  # ww [B, N]
    docs = scipy.sparse.csr_matrix((np.ones(len(lay.doc_gram)), (lay.doc_gram, lay.doc_image)),
                                   shape=(lay.num_grams, stats.size))
    df = (docs @ ww.T).T  # [B, G] weighted number of images whose references hold the n-gram
    idf = np.log(ww.sum(1))[:, None] - np.log(np.maximum(1.0, df))  # [B, G]

    def seg(mat, values):  # values [B, E] -> [B, rows]
        return (mat @ values.T).T

    n = stats.guess.shape[1]
    hyp_norm = np.sqrt(seg(lay.hyp_seg, (lay.hyp_tf * idf[:, lay.hyp_gram]) ** 2)).reshape(len(ww), -1, n)
    ref_norm = np.sqrt(seg(lay.ref_seg, (lay.ref_tf * idf[:, lay.ref_gram]) ** 2)).reshape(len(ww), -1, n)
    gi = idf[:, lay.match_gram]
    vh, vr = lay.match_hyp_tf * gi, lay.match_ref_tf * gi
    dot = seg(lay.match_seg, np.minimum(vh, vr) * vr).reshape(len(ww), -1, n)  # [B, P, n]
    denom = hyp_norm[:, lay.pair_image] * ref_norm
    val = np.where(denom != 0, dot / np.where(denom != 0, denom, 1.0), dot) * lay.pair_penalty[None, :, None]
    per_pair = val.mean(-1)  # [B, P]
    per_image = seg(_segments(list(lay.pair_image), stats.size), per_pair)
    return 10.0 * per_image / lay.refs_per_image


def cider_d(stats: TextStats, w=None) -> np.ndarray:
    """Corpus CIDEr-D (mean over sentences): scalar, or [B]."""
    ww = _weights(stats, w)
    out = np.sum(ww * cider_sentences(stats, ww), 1) / ww.sum(1)
    return out[0] if w is None or np.ndim(w) == 1 else out


def caption_metrics(stats: TextStats, w=None) -> dict[str, np.ndarray]:
    """BLEU-1..4, ROUGE-L, CIDEr-D under weights (None = every sentence once)."""
    b = bleu(stats, w)
    out = {f"bleu_{k + 1}": b[..., k] for k in range(b.shape[-1])}
    out["rouge_l"] = rouge_l(stats, w)
    out["cider_d"] = cider_d(stats, w)
    return out
