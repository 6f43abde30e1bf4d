"""`gpfm-eval vqa`: visual question answering on frozen features.

- `--format wsivqa` (slide VQA, WSI-VQA as W2T runs it): slide files of gpfm-extract, one WsiVQA_{split}.json per
  split (a question's case id is matched to the first slide file whose name starts with it). The W2T model reads
  the question as a decoder prefix and writes the answer by beam search; answers are scored with BLEU-1..4 /
  ROUGE-L / CIDEr-D, and multiple-choice questions by accuracy after matching the generated answer to the closest
  choice (highest ROUGE-L; ties: the first), and survival-time questions by Harrell's C of the generated numbers
  (`survival_cindex`). Epochs are selected on the validation multiple-choice accuracy (BLEU-4 where the validation
  split has no choices).
- `--format pathvqa` (tile VQA, PathVQA as MUMC runs it): tile-feature files of gpfm-extract (image = the stored
  path's file name), MUMC's question / answer JSON and answer list; each test question's answer is the list's most
  likely answer under the model; accuracy after MUMC's normalisation, overall / closed / open; epochs selected on
  validation accuracy.

Tokenizers are built from the training split only: W2T's word vocabulary (words seen >= `min_count` times) for
slide VQA, a WordPiece trained with HuggingFace `tokenizers` (`gpfm_jax.text.wordpiece`) for tile VQA. The tile-VQA
WordPiece is saved next to the results (`X.json` -> `X.tokenizer.json`) and `tokenizer=` (`--tokenizer`) loads a
saved one instead of training, to the same ids.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from gpfm_jax.evaluation import bags, data as tile_data, text_fit
from gpfm_jax.evaluation.results import write_json_atomic
from gpfm_jax.text import answers, data, metrics as text_metrics
from gpfm_jax.text.models import TextModelConfig
from gpfm_jax.text.tokenize import WordVocab, clean_vqa_text
from gpfm_jax.text.train import TextTrainer, TrainConfig
from gpfm_jax.text.wordpiece import BERT_VOCAB, Pieces

log = logging.getLogger("gpfm_jax.evaluate")


@dataclasses.dataclass
class VQARun:
    format: str  # wsivqa | pathvqa
    features: list[str]  # a slide-file folder (wsivqa) or tile-feature .h5 files (pathvqa)
    train: str
    val: str
    test: str
    answer_list: str | None = None
    model: TextModelConfig = dataclasses.field(default_factory=TextModelConfig)
    optim: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    min_count: int = 1
    max_length: int = 60  # answer ids (W2T: 60)
    max_question: int = 30
    bootstrap: int = 1000
    eval_batch: int = 8
    bucket_factor: float = 1.25
    smallest_bucket: int = 256
    vocab_size: int = BERT_VOCAB  # pathvqa: WordPiece size at most (trained on the training split)
    tokenizer: str | None = None  # pathvqa: a saved WordPiece (X.tokenizer.json) to use instead of training one


def _pad(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : min(len(r), width)] = r[:width]
    return out


class _Rows:
    """A bag store over in-memory tile features: sample i -> features[i : i + 1] (one token per image)."""

    def __init__(self, features: np.ndarray):
        self.features = features

    def __getitem__(self, i: int) -> np.ndarray:
        return self.features[i : i + 1]


def _load_questions(cfg: VQARun):
    read = data.read_wsivqa if cfg.format == "wsivqa" else data.read_pathvqa
    return {"train": read(cfg.train), "val": read(cfg.val), "test": read(cfg.test)}


def _store(cfg: VQARun, qs):
    """(bag store, {image key: bag index}, feature dim)."""
    if cfg.format == "wsivqa":
        if len(cfg.features) != 1:
            raise ValueError("--format wsivqa takes one folder of slide files as --features")
        files = bags.feature_files(cfg.features[0])
        names = sorted(files)
        keys = [q.image for split in qs.values() for q in split]
        found, _ = data.match_slides(keys, files, prefix=True)
        position = {n: i for i, n in enumerate(names)}
        index = {k: position[v] for k, v in found.items()}
        store = bags.BagStore([files[n] for n in names])
        dims = {store[i].shape[1] for i in set(index.values())} or {0}
        return store, index, max(dims)
    feats, paths = tile_data.read_features(cfg.features)
    index = {}
    for i, p in enumerate(paths):
        name = os.path.basename(p)
        index.setdefault(name, i)
        index.setdefault(os.path.splitext(name)[0], i)
    return _Rows(feats), index, feats.shape[1]


def _kept(questions, index, name: str):
    kept = [q for q in questions if q.image in index]
    missing = sorted({q.image for q in questions if q.image not in index})
    if missing:
        log.warning("%d %s images / slides have no features; their questions are left out: %s", len(missing), name,
                    ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if not kept:
        raise ValueError(f"no {name} question has features")
    return kept


def survival_cindex(questions, generated: list[list[str]]) -> tuple[float | None, int]:
    """(Harrell's C, pairs used) over the survival-time questions whose true and generated answers are both
    numbers, every time an event (as W2T scores it); risk = minus the predicted time, so a longer predicted survival
    is a lower risk (W2T hands the predicted time to scikit-survival as the risk itself, which reverses the
    index). None with fewer than two such questions."""
    from gpfm_jax.evaluation.survival import concordance_index

    t, pred = [], []
    for q, g in zip(questions, generated):
        answer, guess = clean_vqa_text(q.answer).strip(), "".join(g)
        if "survival time" in clean_vqa_text(q.question) and answer.isdecimal() and guess.isdecimal():
            t.append(float(answer))
            pred.append(float(guess))
    if len(t) < 2:
        return None, len(t)
    c = concordance_index(np.asarray(t), -np.asarray(pred), np.ones(len(t), bool))
    return (None if np.isnan(c) else float(c)), len(t)


def closest_choice(generated: list[str], choices: tuple[str, ...]) -> str:
    scores = [text_metrics.rouge_l_sentence(generated, [clean_vqa_text(c).split()]) for c in choices]
    return choices[int(np.argmax(scores))]


def tokenizer_path(out: str) -> str:
    """Where a run writing `out` keeps its tile-VQA tokenizer: results.json -> results.tokenizer.json."""
    return (out[: -len(".json")] if out.endswith(".json") else out) + ".tokenizer.json"


def _tile_tokenizer(cfg: VQARun, texts: list[str], out: str | None) -> tuple[Pieces, str | None]:
    """The saved WordPiece `cfg.tokenizer`, or one trained on `texts` and saved beside `out`."""
    if cfg.tokenizer:
        return Pieces.load(cfg.tokenizer), cfg.tokenizer
    pieces = Pieces.train(texts, cfg.vocab_size, cfg.min_count)
    if not out:
        return pieces, None
    path = tokenizer_path(out)
    write_json_atomic(path, pieces.to_json())
    return pieces, path


def run_vqa(cfg: VQARun, out: str | None = None) -> dict:
    if cfg.format not in ("wsivqa", "pathvqa"):
        raise ValueError(f"--format must be wsivqa or pathvqa, got {cfg.format!r}")
    qs = _load_questions(cfg)
    store, index, dim = _store(cfg, qs)
    qs = {s: _kept(v, index, s) for s, v in qs.items()}
    slide = cfg.format == "wsivqa"
    clean_q = clean_vqa_text if slide else (lambda t: answers.clean_question(t, cfg.max_question))
    clean_a = clean_vqa_text if slide else answers.normalize_answer
    texts = [clean_q(q.question) for q in qs["train"]] + [clean_a(q.answer) for q in qs["train"]]
    if slide:
        vocab, saved = WordVocab.build(texts, lambda t: t, cfg.min_count, with_bos=True), None
        question_ids = lambda text: vocab.encode_tokens(text.split())  # noqa: E731
    else:
        vocab, saved = _tile_tokenizer(cfg, texts, out)
        question_ids = vocab.ids

    def split_of(questions):
        qids = _pad([question_ids(clean_q(q.question)) for q in questions], cfg.max_question)
        toks = _pad([vocab.encode(q.answer, clean_a, cfg.max_length) for q in questions], cfg.max_length)
        ids = [q.qid or f"{q.image}:{i}" for i, q in enumerate(questions)]
        bag = np.asarray([index[q.image] for q in questions])
        if slide:
            return text_fit.TextSplit(ids, bag, qids, toks)
        return text_fit.TextSplit(ids, bag, np.zeros((len(questions), 0), np.int32), toks, qids)

    splits = {s: split_of(v) for s, v in qs.items()}
    lengths = [len(store[int(b)]) for sp in splits.values() for b in sp.bag]
    sizes = bags.bucket_sizes(max(lengths), cfg.smallest_bucket, cfg.bucket_factor) if slide else [1]
    width = cfg.max_length + (cfg.max_question if slide else 0)
    model_cfg = dataclasses.replace(cfg.model, kind="slide_vqa" if slide else "tile_vqa", vocab_size=vocab.size,
                                    region_size=0, memory_slots=0, max_length=max(cfg.model.max_length, width))
    trainer = TextTrainer(model_cfg, cfg.optim, dim)
    if slide:
        result = _slide(cfg, trainer, store, sizes, vocab, splits, qs)
    else:
        result = _tile(cfg, trainer, store, sizes, vocab, splits, qs)
    if not slide:
        result["tokenizer"] = {"kind": "wordpiece", "file": saved,
                               "source": "loaded" if cfg.tokenizer else "trained on the training split"}
    result.update({"command": "vqa", "format": cfg.format, "vocab_size": vocab.size,
                   "num_questions": {s: len(v) for s, v in qs.items()}, "compiles": dict(trainer.compiles)})
    if out:
        write_json_atomic(out, result)
    return result


def _slide(cfg, trainer, store, sizes, vocab, splits, qs) -> dict:
    def answers_of(split, params):
        seqs = text_fit.generate(trainer, store, split, sizes, cfg.eval_batch, vocab.start_id, cfg.max_length,
                                 params)
        return [vocab.decode(s[1:]) for s in seqs]

    def mc(questions, gen):
        rows = [i for i, q in enumerate(questions) if q.choices]
        correct = answers.answer_correct([closest_choice(gen[i], questions[i].choices) for i in rows],
                                         [questions[i].answer for i in rows])
        return rows, correct

    def validate(params):
        gen = answers_of(splits["val"], params)
        rows, correct = mc(qs["val"], gen)
        if rows:
            return float(correct.mean())
        refs = [[clean_vqa_text(q.answer).split()] for q in qs["val"]]
        return text_metrics.bleu(text_metrics.text_stats(gen, refs))[3]

    params, history, selected = text_fit.fit(trainer, store, splits["train"], splits["val"], sizes, cfg.optim.batch_size,
                                    cfg.optim.epochs, validate, cfg.optim.seed)
    test_q = qs["test"]
    gen = answers_of(splits["test"], params)
    refs = [[vocab.decode(vocab.encode(q.answer, clean_vqa_text)[1:])] for q in test_q]
    result = {"task": "slide_vqa", "metric": "accuracy", **text_fit.caption_scores(gen, refs, cfg.bootstrap,
                                                                                   cfg.optim.seed)}
    rows, correct = mc(test_q, gen)
    closed = np.asarray([answers.normalize_answer(test_q[i].answer) in ("yes", "no") for i in rows], bool)
    acc = text_fit.accuracy_scores(correct, closed, cfg.bootstrap, cfg.optim.seed) if rows else None
    if acc:
        result["metrics"].update(acc["metrics"])
        result["ci"].update(acc["ci"])
    cindex, used = survival_cindex(test_q, gen)
    result["survival_c_index"] = {"value": cindex, "questions": used}
    hit = dict(zip(rows, correct))
    result.update({"selected_epoch": selected, "selection": "validation multiple-choice accuracy",
                   "history": history,
                   "predictions": [{"id": s, "question": q.question, "prediction": " ".join(g),
                                    "reference": " ".join(r[0]), "answer": q.answer, "choices": list(q.choices),
                                    "correct": (float(hit[i]) if i in hit else None)}
                                   for i, (s, q, g, r) in enumerate(zip(splits["test"].ids, test_q, gen, refs))]})
    return result


def _tile(cfg, trainer, store, sizes, vocab, splits, qs) -> dict:
    if not cfg.answer_list:
        raise ValueError("--format pathvqa needs --answer-list (MUMC's answer_trainval_list.json)")
    candidates = data.read_answer_list(cfg.answer_list)
    answer_ids = _pad([vocab.encode(a, answers.normalize_answer, cfg.max_length) for a in candidates],
                      cfg.max_length)

    def predicted(split, params):
        return [candidates[i] for i in text_fit.rank(trainer, store, split, sizes, cfg.eval_batch, answer_ids,
                                                     params)]

    def validate(params):
        return float(answers.answer_correct(predicted(splits["val"], params), [q.answer for q in qs["val"]]).mean())

    params, history, selected = text_fit.fit(trainer, store, splits["train"], splits["val"], sizes, cfg.optim.batch_size,
                                   cfg.optim.epochs, validate, cfg.optim.seed)
    test_q = qs["test"]
    pred = predicted(splits["test"], params)
    correct = answers.answer_correct(pred, [q.answer for q in test_q])
    closed = np.asarray([answers.is_closed(q.answer_type) for q in test_q], bool)
    result = {"task": "vqa", "metric": "accuracy",
              **text_fit.accuracy_scores(correct, closed, cfg.bootstrap, cfg.optim.seed)}
    result["metrics"]["accuracy_mumc_contains"] = float(
        answers.answer_correct(pred, [q.answer for q in test_q], contains=True).mean())
    result.update({"selected_epoch": selected, "selection": "validation accuracy", "history": history,
                   "num_candidates": len(candidates),
                   "predictions": [{"id": s, "image": q.image, "question": q.question, "prediction": p,
                                    "answer": q.answer, "answer_type": q.answer_type, "correct": float(c)}
                                   for s, q, p, c in zip(splits["test"].ids, test_q, pred, correct)]})
    return result
