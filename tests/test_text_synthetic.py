"""Proof that the text tasks learn the right thing: synthetic slides with planted tile signatures, template reports
and yes/no + "what type" questions are learned (BLEU-4 > 0.9, accuracy near 1) through gpfm-eval report / vqa,
while the same tasks with the features shuffled among slides stay at the answer prior. Bad input is named."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from gpfm_jax.evaluation import cli
from gpfm_jax.text import metrics, synthetic
from gpfm_jax.text.tokenize import clean_report

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

SMALL = ["--width", "32", "--heads", "2", "--layers", "1", "--encoder-layers", "1", "--dropout", "0",
         "--lr", "3e-3", "--lr-decay", "0.95", "--clip-value", "1.0", "--batch-size", "8", "--beam", "2",
         "--min-count", "1", "--eval-batch", "16", "--bootstrap", "200", "--smallest-bucket", "16"]
REPORT = ["--memory-slots", "16", "--region-size", "4", "--max-length", "16", "--epochs", "20", "--no-meteor"]
VQA = ["--max-length", "6", "--max-question", "8", "--epochs", "12"]


def _report(tmp, shuffle):
    p = synthetic.make_report_task(tmp / ("shuffled" if shuffle else "real"), num_slides=200, signal=4.0,
                                   shuffle=shuffle)
    out = tmp / f"report_{shuffle}.json"
    assert cli.main(["report", "--features", p["features"], "--annotations", p["annotations"], "--out", str(out),
                     *SMALL, *REPORT]) == 0
    return json.loads(out.read_text()), p


def _vqa(tmp, shuffle):
    p = synthetic.make_vqa_task(tmp / ("vqa_shuffled" if shuffle else "vqa_real"), num_slides=200, signal=4.0,
                                shuffle=shuffle)
    out = tmp / f"vqa_{shuffle}.json"
    assert cli.main(["vqa", "--format", "wsivqa", "--features", p["features"], "--train", p["train"], "--val",
                     p["val"], "--test", p["test"], "--out", str(out), *SMALL, *VQA]) == 0
    return json.loads(out.read_text()), p


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):  # cache_dir: test_text_bench compiles the same programs
    tmp = tmp_path_factory.mktemp("synthetic_text")
    return {"report": _report(tmp, False), "report_shuffled": _report(tmp, True),
            "vqa": _vqa(tmp, False), "vqa_shuffled": _vqa(tmp, True)}


def _report_prior(paths) -> float:
    """BLEU-4 of writing the most common training report for every test slide."""
    ann = json.loads(open(paths["annotations"]).read())
    common = collections.Counter(clean_report(e["report"]) for e in ann["train"]).most_common(1)[0][0].split()
    refs = [[clean_report(e["report"]).split()] for e in ann["test"]]
    return float(metrics.bleu(metrics.text_stats([common] * len(refs), refs))[3])


def test_report_learned_and_shuffled_control_is_not(runs):
    real, paths = runs["report"]
    shuffled, _ = runs["report_shuffled"]
    assert real["metrics"]["bleu_4"] > 0.9 and real["metrics"]["rouge_l"] > 0.9
    prior = _report_prior(paths)
    assert shuffled["metrics"]["bleu_4"] < prior + 0.1 < real["metrics"]["bleu_4"] - 0.2
    # results.json: every test slide's text, intervals around the point values, selection on validation
    assert len(real["predictions"]) == real["num_slides"]["test"] == 40
    for k, (lo, hi) in real["ci"].items():
        assert lo <= real["metrics"][k] + 1e-9 and real["metrics"][k] <= hi + 1e-9, k
    scores = [h["val_score"] for h in real["history"]]
    assert scores[real["selected_epoch"] - 1] == max(scores)
    # One bucket: one program each. The programs are shared by every run of this process with the same model and
    # settings (text/train.py: `programs`), so the counter may also hold shapes an earlier test compiled; what must
    # hold is that nothing was compiled twice and that this run's two shapes are there.
    assert {"train 8x64", "decode 16x64"} <= set(real["compiles"]), real["compiles"]
    assert all(count == 1 for count in real["compiles"].values()), real["compiles"]
    assert real["meteor_skipped"].startswith("METEOR skipped")


def test_vqa_learned_and_shuffled_control_is_not(runs):
    real, paths = runs["vqa"]
    shuffled, _ = runs["vqa_shuffled"]
    assert real["metrics"]["accuracy"] >= 0.9 and real["metrics"]["closed_accuracy"] >= 0.95
    train = json.loads(open(paths["train"]).read())
    test = json.loads(open(paths["test"]).read())
    majority = {q: collections.Counter(e["Answer"] for e in train if e["Question"] == q).most_common(1)[0][0]
                for q in {e["Question"] for e in train}}
    prior = np.mean([majority[e["Question"]] == e["Answer"] for e in test])
    assert shuffled["metrics"]["accuracy"] < prior + 0.15 < real["metrics"]["accuracy"]
    assert all(p["correct"] in (0.0, 1.0) for p in real["predictions"])


def test_bad_input_is_named(tmp_path, capsys):
    p = synthetic.make_report_task(tmp_path, num_slides=10)
    ann = json.loads(open(p["annotations"]).read())
    for e in ann["test"]:
        e["id"] = "NO-SUCH-" + e["id"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(ann))
    assert cli.main(["report", "--features", p["features"], "--annotations", str(bad), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "NO-SUCH-SYN-0008" in err and "no test slide of the annotations has a feature file" in err
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"qid": 1, "image_name": "a.jpg", "question": "what?", "answer": "x"}]))
    assert cli.main(["vqa", "--format", "pathvqa", "--features", "none.h5", "--train", str(q), "--val", str(q),
                     "--test", str(q), *SMALL]) == 2
    assert "q.json: entry 0 (qid 1) has no 'answer_type' field" in capsys.readouterr().err


def test_tile_vqa_ranks_the_answer_list(tmp_path, cache_dir):
    """PathVQA through MUMC's format: the answer list ranked by likelihood learns closed and open questions."""
    p = synthetic.make_tile_vqa_task(tmp_path, num_images=200, signal=4.0)
    out = tmp_path / "tile_vqa.json"
    assert cli.main(["vqa", "--format", "pathvqa", "--features", p["features"], "--train", p["train"], "--val",
                     p["val"], "--test", p["test"], "--answer-list", p["answer_list"], "--out", str(out),
                     *SMALL, *VQA]) == 0
    r = json.loads(out.read_text())
    assert r["metrics"]["closed_accuracy"] >= 0.95 and r["metrics"]["open_accuracy"] >= 0.85
    assert r["num_candidates"] == 6 and len(r["predictions"]) == r["num_questions"]["test"]
    assert r["tokenizer"]["kind"] == "wordpiece" and r["tokenizer"]["file"].endswith("tile_vqa.tokenizer.json")
    assert all(pr["prediction"] in ("yes", "no", "ductal", "lobular", "mucinous", "normal")
               for pr in r["predictions"])
