"""The training / selection / prediction loop every text task shares (report generation, slide VQA, tile VQA).

A split is a `TextSplit`: per sample the index of its bag of frozen features, the decoder prefix (W2T's question),
the tile-VQA question and the target token ids, all padded to fixed widths. Training runs batches of `batch_size`
samples padded to a few bag-size buckets (one compile per bucket, as gpfm-eval mil); after each epoch the
validation split is decoded and scored, and the epoch with the best validation score is kept — the test split is
predicted once, with those parameters (the reference codes select on the test set; this does not).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
import numpy as np

from gpfm_jax.evaluation import bags, metrics
from gpfm_jax.text import answers as vqa_answers, metrics as text_metrics
from gpfm_jax.text.train import TextTrainer

log = logging.getLogger("gpfm_jax.evaluate")


@dataclasses.dataclass
class TextSplit:
    ids: list[str]  # sample ids (slide id, question id)
    bag: np.ndarray  # int [n]: index into the bag store
    prefix: np.ndarray  # int32 [n, P] (P may be 0)
    tokens: np.ndarray  # int32 [n, T]: start, ids, 0, padding
    question: np.ndarray | None = None  # int32 [n, Q] (tile VQA)

    def __len__(self) -> int:
        return len(self.ids)


def _batches(idx: np.ndarray, size: int, rng: np.random.Generator | None, pool: np.ndarray) -> list[np.ndarray]:
    """Fixed-size batches; the last is filled with other samples (training) or repeats (prediction) so every
    batch has one shape."""
    out = [idx[i : i + size] for i in range(0, len(idx), size)]
    if out and len(out[-1]) < size:
        need = size - len(out[-1])
        fill = rng.choice(pool, need) if rng is not None else np.repeat(out[-1][-1:], need)
        out[-1] = np.concatenate([out[-1], fill])
    return out


def _inputs(store, split: TextSplit, rows: np.ndarray, sizes: list[int]):
    bagz = [store[int(split.bag[r])] for r in rows]
    x, mask = bags.pad_bags(bagz, bags.bucket_for(max(len(b) for b in bagz), sizes))
    q = split.question[rows] if split.question is not None else None
    return x, mask, split.prefix[rows], q


def train_epoch(trainer: TextTrainer, store, split: TextSplit, sizes, batch_size: int, epoch: int,
                rng: np.random.Generator) -> float:
    losses = []
    pool = np.arange(len(split))
    for rows in _batches(rng.permutation(len(split)), batch_size, rng, pool):
        x, mask, prefix, q = _inputs(store, split, rows, sizes)
        losses.append(trainer.train_batch(x, mask, prefix, split.tokens[rows], q, epoch))
    return float(np.mean(jax.device_get(losses))) if losses else float("nan")


def _by_bucket(store, split: TextSplit, sizes) -> dict[int, np.ndarray]:
    groups: dict[int, list[int]] = {}
    for r in range(len(split)):
        groups.setdefault(bags.bucket_for(len(store[int(split.bag[r])]), sizes), []).append(r)
    return {k: np.asarray(v) for k, v in groups.items()}


def generate(trainer: TextTrainer, store, split: TextSplit, sizes, batch_size: int, start: int, length: int,
             params=None) -> np.ndarray:
    """int [n, length] decoded sequences, samples grouped by bucket and batched with a fixed batch shape."""
    out = np.zeros((len(split), length), np.int32)
    for _, rows in sorted(_by_bucket(store, split, sizes).items()):
        for b in _batches(rows, batch_size, None, rows):
            x, mask, prefix, q = _inputs(store, split, b, sizes)
            seqs = trainer.generate(x, mask, prefix, q, start, length, params)
            out[b] = seqs  # repeated fill rows write the same values
    return out


def rank(trainer: TextTrainer, store, split: TextSplit, sizes, batch_size: int, answer_ids: np.ndarray,
         params=None) -> np.ndarray:
    """int [n]: index of the most likely candidate answer per sample."""
    out = np.zeros(len(split), np.int64)
    for _, rows in sorted(_by_bucket(store, split, sizes).items()):
        for b in _batches(rows, batch_size, None, rows):
            x, mask, prefix, q = _inputs(store, split, b, sizes)
            out[b] = trainer.rank(x, mask, prefix, q, answer_ids, params)[0]
    return out


def fit(trainer: TextTrainer, store, train: TextSplit, val: TextSplit, sizes, batch_size: int, epochs: int,
        validate: Callable[[object], float], seed: int = 0) -> tuple[object, list[dict], int]:
    """Trains `epochs` epochs; returns (parameters of the best validation epoch, per-epoch history, that epoch)."""
    rng = np.random.default_rng(seed)
    best, best_params, history, selected = -np.inf, None, [], 0
    for epoch in range(epochs):
        loss = train_epoch(trainer, store, train, sizes, batch_size, epoch, rng)
        score = float(validate(trainer.params))
        history.append({"epoch": epoch + 1, "train_loss": loss, "val_score": score})
        log.debug("epoch %d: train loss %.4f, validation %.4f", epoch + 1, loss, score)
        if score >= best or best_params is None:  # ties: the later epoch, as HistGen
            best, best_params = score, jax.tree.map(np.array, trainer.params)  # host copy: steps donate buffers
            selected = epoch + 1
    return best_params, history, selected


# ------------------------------------------------------------------------------------------------ scoring


def bootstrap_draws(n: int, num_samples: int, seed: int) -> np.ndarray:
    """float [num_samples, n]: how often each sample is drawn in each resample (seeded, as metrics.bootstrap)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(num_samples)]).astype(float)


def caption_scores(hyps: list[list[str]], refs: list[list[list[str]]], num_samples: int, seed: int,
                   chunk: int = 50) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr-D with percentile intervals (resampled sentences as weights, in chunks)."""
    stats = text_metrics.text_stats(hyps, refs)
    point = {k: float(v) for k, v in text_metrics.caption_metrics(stats).items()}
    ci = {}
    if num_samples > 0 and len(hyps) > 0:
        w = bootstrap_draws(len(hyps), num_samples, seed)
        parts = [text_metrics.caption_metrics(stats, w[i : i + chunk]) for i in range(0, num_samples, chunk)]
        for k in point:
            ci[k] = metrics._percentiles(np.concatenate([p[k] for p in parts]), 0.95)
    return {"metrics": point, "ci": ci}


def accuracy_scores(correct: np.ndarray, closed: np.ndarray, num_samples: int, seed: int) -> dict:
    point = {k: float(v) for k, v in vqa_answers.vqa_accuracy(correct, closed).items()}
    ci = {}
    if num_samples > 0 and len(correct) > 0:
        draws = vqa_answers.vqa_accuracy(correct, closed, bootstrap_draws(len(correct), num_samples, seed))
        ci = {k: metrics._percentiles(v, 0.95) for k, v in draws.items()}
    return {"metrics": point, "ci": ci}
