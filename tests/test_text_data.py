"""Tokenizers (HistGen / WSI-VQA cleaning, vocabularies from the training split) and annotation readers."""

from __future__ import annotations

import json
import logging

import pytest

from gpfm_jax.text import data, tokenize


def test_histgen_cleaning_hand_traced():
    # "1. " dropped; ". 2. " then " 2. " turned into sentence ends (HistGen loses "grade 2" this way); ".." -> ".";
    # the class [.,?;*!%^&_+():-[]{}] and quotes deleted
    text = 'FINAL DIAGNOSIS:\n1. Breast, left (mastectomy): Invasive ductal carcinoma.. Grade 2. 2. Margins free; ' \
           'see note. "ER" 95%'
    want = "final diagnosis breast left mastectomy invasive ductal carcinoma . grade . margins free see note . er 95 ."
    assert tokenize.clean_report(text) == want
    assert tokenize.clean_report("A. . B") == "a .  . b ."  # empty sentences kept
    assert tokenize.clean_report("x <y> = z @ w") == "x y  z  w ."  # ":-[" is a range: < = > ? @ go too


def test_wsivqa_cleaning_hand_traced():
    assert tokenize.clean_vqa_text("What is the size of the tumor? 2.6 cm (left) [a]").split() == \
        "what is the size of the tumor 2.6 cm left a".split()
    assert tokenize.clean_vqa_text("ER/PR positive. HER2: 1+").split() == "er/pr positive . her2 1".split()


def test_vocabulary_from_train_only_and_round_trip():
    train = ["tumor grade 2 .", "tumor margins clear .", "tumor grade"]
    vocab = tokenize.WordVocab.build(train, tokenize.clean_report, min_count=2)
    assert vocab.words == [".", "<unk>", "grade", "tumor"]  # "margins", "clear", "2" seen < 2 times
    ids = vocab.encode("Tumor grade, margins.", tokenize.clean_report)
    assert ids == [0, 4, 3, 2, 1, 0]
    assert vocab.decode(ids[1:]) == ["tumor", "grade", "<unk>", "."]
    assert vocab.encode("tumor tumor tumor tumor", tokenize.clean_report, max_length=3) == [0, 4, 4]
    w2t = tokenize.WordVocab.build(train, tokenize.clean_vqa_text, min_count=1, with_bos=True)
    assert w2t.start_id == w2t.index["<bos>"] != 0


def test_readers_and_named_errors(tmp_path, caplog):
    ann = {"train": [{"id": "s1", "report": "Carcinoma."}, {"id": "s2", "report": " .. "}],
           "val": [{"id": "s3", "report": "Benign."}], "test": []}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(ann))
    with caplog.at_level(logging.WARNING, logger="gpfm_jax.evaluate"):
        out = data.read_histgen(p)
    assert [r.slide for r in out["train"]] == ["s1"] and "s2" in caplog.text  # empty report named, left out
    p.write_text(json.dumps({"train": [{"id": "s1"}], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"ann.json: train\[0\] has no 'report' field"):
        data.read_histgen(p)
    p.write_text(json.dumps({"train": []}))
    with pytest.raises(ValueError, match="needs an object with 'train', 'val' and 'test'"):
        data.read_histgen(p)

    q = tmp_path / "WsiVQA_train.json"
    q.write_text(json.dumps([{"Id": "TCGA-A2-A0YC", "Question": "size?", "Choice": ["1 cm", "2 cm"],
                              "Answer": "2 cm"}, {"Id": "TCGA-A2-A0YD", "Question": "type?", "Answer": "idc"}]))
    qs = data.read_wsivqa(q)
    assert qs[0].choices == ("1 cm", "2 cm") and qs[1].choices == ()
    found, missing = data.match_slides([x.image for x in qs], {"TCGA-A2-A0YC-01Z-00-DX1": 0}, prefix=True)
    assert found == {"TCGA-A2-A0YC": "TCGA-A2-A0YC-01Z-00-DX1"} and missing == ["TCGA-A2-A0YD"]

    v = tmp_path / "pathvqa_test.json"
    v.write_text(json.dumps([{"qid": 7, "image_name": "a.jpg", "question": "is this x?", "answer": "yes",
                              "answer_type": "CLOSED"}, {"qid": 8, "image": "b.jpg", "question": "what?",
                                                         "answer": "cells"}]))
    with pytest.raises(ValueError, match=r"entry 1 \(qid 8\) has no 'answer_type' field"):
        data.read_pathvqa(v)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        data.read_pathvqa(tmp_path / "nope.json")


def test_survival_cindex_of_generated_times():
    from gpfm_jax.evaluation.vqa_task import survival_cindex

    qs = [data.Question("c1", "Could you predict survival time?", "100"),
          data.Question("c2", "what is survival time according to the slide?", "300"),
          data.Question("c3", "From the slide, can you infer the survival time?", "200"),
          data.Question("c4", "what is the grade?", "2"),
          data.Question("c5", "please predict survival time?", "50")]
    # predicted times 90 / 310 / 150 / - / unparsable: the three numeric pairs are all concordant
    c, used = survival_cindex(qs, [["90"], ["310"], ["150"], ["2"], ["long"]])
    assert (c, used) == (1.0, 3)
    c, _ = survival_cindex(qs, [["310"], ["90"], ["150"], ["2"], ["x"]])  # every pair reversed
    assert c == 0.0
    c, _ = survival_cindex(qs, [["310"], ["150"], ["90"], ["2"], ["x"]])  # only 200 d < 300 d kept in order
    assert c == pytest.approx(1 / 3)
    assert survival_cindex(qs[:1], [["5"]]) == (None, 1)


def test_text_package_sits_below_evaluation_and_bench():
    """gpfm_jax.text imports no layer above it (evaluation, bench, train, plan): the commands import it, never back."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "gpfm_jax" / "text"
    above = ("gpfm_jax.evaluation", "gpfm_jax.encoder_bench", "gpfm_jax.train", "gpfm_jax.plan", "gpfm_jax.extract")
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not [n for n in names if n.startswith(above)], (path.name, names)
