"""`gpfm-eval report`: slide report generation (TCGA-Report as HistGen runs it) on gpfm-extract's slide files.

Reports come from a HistGen annotation JSON (train / val / test), tokenised with HistGen's word tokenizer built on
the training reports (words seen >= `min_count` times); a report is truncated to `max_length` ids as HistGen does,
and the reference a prediction is scored against is that truncated, tokenised report (unknown words as <unk>), as
HistGen scores. The report generator trains for `epochs` epochs, the epoch with the best validation BLEU-4 is kept,
and the test slides' reports are written by beam search. results.json holds every test slide's generated and
reference report, BLEU-1..4 / ROUGE-L / CIDEr-D with bootstrap intervals, METEOR (or the reason it was skipped), the
validation history and the compile count. Slides without a feature file are warned about, named and left out.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from gpfm_jax.evaluation import bags, text_fit
from gpfm_jax.evaluation.results import write_json_atomic
from gpfm_jax.text import data, meteor, metrics as text_metrics
from gpfm_jax.text.models import TextModelConfig
from gpfm_jax.text.tokenize import WordVocab, clean_report
from gpfm_jax.text.train import TextTrainer, TrainConfig

log = logging.getLogger("gpfm_jax.evaluate")


@dataclasses.dataclass
class ReportRun:
    features: str
    annotations: str
    model: TextModelConfig = dataclasses.field(default_factory=TextModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    min_count: int = 10
    max_length: int = 100
    bootstrap: int = 1000
    eval_batch: int = 8
    bucket_factor: float = 1.25
    smallest_bucket: int = 256
    with_meteor: bool = True


def _split(store_index: dict[str, int], reports: list[data.Report], vocab: WordVocab, length: int, name: str):
    kept = [r for r in reports if r.slide in store_index]
    missing = [r.slide for r in reports if r.slide not in store_index]
    if missing:
        log.warning("%d %s slides have no feature file and are left out: %s", len(missing), name, ", ".join(missing))
    if not kept:
        raise ValueError(f"no {name} slide of the annotations has a feature file")
    tokens = np.zeros((len(kept), length), np.int32)
    refs = []
    for i, r in enumerate(kept):
        ids = vocab.encode(r.text, clean_report, length)
        tokens[i, : len(ids)] = ids
        refs.append([vocab.decode(ids[1:])])
    split = text_fit.TextSplit([r.slide for r in kept], np.asarray([store_index[r.slide] for r in kept]),
                               np.zeros((len(kept), 0), np.int32), tokens)
    return split, refs


def run_report(cfg: ReportRun, out: str | None = None) -> dict:
    reports = data.read_histgen(cfg.annotations)
    files = bags.feature_files(cfg.features)
    names = sorted(files)
    store_index = {n: i for i, n in enumerate(names)}
    vocab = WordVocab.build([r.text for r in reports["train"]], clean_report, cfg.min_count)
    splits = {s: _split(store_index, reports[s], vocab, cfg.max_length, s) for s in data.SPLITS}
    used = sorted({int(b) for s, _ in splits.values() for b in s.bag})
    store = bags.BagStore([files[n] for n in names])
    dims = {store[i].shape[1] for i in used}
    if len(dims) != 1:
        raise bags.BagError(f"feature files disagree on the feature dimension: {sorted(dims)}")
    sizes = bags.bucket_sizes(max(len(store[i]) for i in used), cfg.smallest_bucket, cfg.bucket_factor)
    model_cfg = dataclasses.replace(cfg.model, kind="report", vocab_size=vocab.size,
                                    max_length=max(cfg.model.max_length, cfg.max_length))
    trainer = TextTrainer(model_cfg, cfg.train, dims.pop())
    (train, _), (val, val_refs), (test, test_refs) = splits["train"], splits["val"], splits["test"]

    def decoded(split, params):
        seqs = text_fit.generate(trainer, store, split, sizes, cfg.eval_batch, vocab.start_id, cfg.max_length,
                                 params)
        return [vocab.decode(s[1:]) for s in seqs]

    def validate(params):
        return text_metrics.bleu(text_metrics.text_stats(decoded(val, params), val_refs))[3]

    params, history, selected = text_fit.fit(trainer, store, train, val, sizes, cfg.train.batch_size, cfg.train.epochs,
                                   validate, cfg.train.seed)
    hyps = decoded(test, params)
    result = {"command": "report", "task": "report", "metric": "bleu_4",
              **text_fit.caption_scores(hyps, test_refs, cfg.bootstrap, cfg.train.seed)}
    reason = meteor.meteor_unavailable() if cfg.with_meteor else "METEOR skipped: not requested"
    if reason is None:
        result["metrics"]["meteor"], _ = meteor.meteor(hyps, test_refs)
    else:
        result["meteor_skipped"] = reason
        log.warning("%s", reason)
    result.update({
        "selected_epoch": selected, "selection": "validation bleu_4", "history": history,
        "vocab_size": vocab.size, "num_slides": {s: len(splits[s][0]) for s in data.SPLITS},
        "compiles": dict(trainer.compiles),
        "predictions": [{"id": i, "prediction": " ".join(h), "reference": " ".join(r[0])}
                        for i, h, r in zip(test.ids, hyps, test_refs)],
    })
    if out:
        write_json_atomic(out, result)
    return result
