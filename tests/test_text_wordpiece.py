"""The tile-VQA WordPiece (HuggingFace `tokenizers`): learned from the training split only, exact round trips,
a saved tokenizer reloads to the same ids, and gpfm-eval vqa --format pathvqa saves it and reuses it."""

from __future__ import annotations

import json

import pytest

from conftest import require
from gpfm_jax.evaluation import cli
from gpfm_jax.evaluation.results import write_json_atomic
from gpfm_jax.text import answers, synthetic

require("tokenizers", "test")
from gpfm_jax.text.wordpiece import Pieces  # noqa: E402

TRAIN_Q = ["what does this image show?", "Is there evidence of necrosis?", "how are the cells arranged?",
           "what is present?", "does this image show carcinoma of the breast?", "is the tumor cells arranged?"]
TRAIN_A = ["necrosis", "yes", "no", "in nests", "carcinoma", "tumor cells", "h&e"]


@pytest.fixture(scope="module")
def pieces():
    texts = [answers.clean_question(q) for q in TRAIN_Q] + [answers.normalize_answer(a) for a in TRAIN_A]
    return Pieces.train(texts)


def test_special_ids_and_training_words_are_whole_tokens(pieces):
    vocab = pieces.tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]")] == [0, 1, 2] and pieces.start_id == 2
    for word in " ".join(answers.clean_question(q) for q in TRAIN_Q).split():
        assert pieces.pieces(word) == [word]  # a training word is one token of its own
    assert pieces.size == len(vocab)
    ids = pieces.encode("Necrosis!", answers.normalize_answer)
    assert ids == [2, vocab["necrosis"], 0] and pieces.encode("tumor cells", str, max_length=3)[-1] != 0


def test_test_only_words_are_pieces_or_unknown(pieces):
    vocab = pieces.tokenizer.get_vocab()
    # "tumors", "arrangement", "presented" occur only at test time: longest known pieces, never a token of their own
    assert pieces.pieces("tumors") == ["tumor", "##s"]
    for word in ("tumors", "arrangement", "presented", "necroses"):
        assert word not in vocab and len(pieces.pieces(word)) > 1
        assert "".join(p.removeprefix("##") for p in pieces.pieces(word)) == word
    # a character never seen in training ("z", "q", "j") makes the word [UNK]
    assert pieces.pieces("quiz") == ["[UNK]"] and pieces.ids("the jejunum") == [vocab["the"], 1]


def test_round_trip_of_training_questions(pieces):
    for q in TRAIN_Q:
        text = answers.clean_question(q)
        assert pieces.decode(pieces.ids(text)) == text
        assert pieces.decode(pieces.encode(text, str)[1:]) == text  # the answer form: stops at the end id 0
    assert pieces.decode(pieces.ids("tumors in h&e")) == "tumors in h & e"  # BERT's decoder spaces punctuation
    assert pieces.decode(pieces.ids("jejunum")) == "[UNK]"


def test_saved_tokenizer_reloads_to_identical_ids(pieces, tmp_path):
    path = tmp_path / "run.tokenizer.json"
    write_json_atomic(path, pieces.to_json())
    back = Pieces.load(str(path))
    assert back.tokenizer.get_vocab() == pieces.tokenizer.get_vocab()
    for text in TRAIN_Q + TRAIN_A + ["tumors presented in the jejunum", "what is   this?"]:
        assert back.ids(text) == pieces.ids(text) and back.encode(text, str, 6) == pieces.encode(text, str, 6)
    with pytest.raises(ValueError, match="nope.json: no such tokenizer file"):
        Pieces.load(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match="bad.json: not a `tokenizers` JSON file"):
        Pieces.load(str(tmp_path / "bad.json"))
    moved = pieces.to_json()
    moved["added_tokens"] = moved["added_tokens"][1:]
    moved["model"]["vocab"]["[PAD]"] = 5
    moved["model"]["vocab"]["tumor"] = 0
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    with pytest.raises(ValueError, match=r"moved.json: tokenizer: needs \[PAD\], \[UNK\], \[CLS\] as ids 0, 1, 2"):
        Pieces.load(str(tmp_path / "moved.json"))


TINY = ["--width", "16", "--heads", "2", "--layers", "1", "--encoder-layers", "1", "--dropout", "0", "--epochs", "1",
        "--batch-size", "8", "--eval-batch", "16", "--bootstrap", "0", "--max-length", "6", "--max-question", "10"]


@pytest.mark.slow
def test_pathvqa_run_trains_on_the_training_split_saves_and_reuses(tmp_path, capsys):
    p = synthetic.make_tile_vqa_task(tmp_path, num_images=40, signal=4.0)
    test = json.loads(open(p["test"]).read())
    for q in test:
        q["question"] = q["question"].replace("image", "biopsy")  # a word of the test split only
    with open(p["test"], "w") as f:
        json.dump(test, f)
    args = ["vqa", "--format", "pathvqa", "--features", p["features"], "--train", p["train"], "--val", p["val"],
            "--test", p["test"], "--answer-list", p["answer_list"], *TINY]
    assert cli.main([*args, "--out", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    saved = tmp_path / "first.tokenizer.json"
    assert first["tokenizer"] == {"kind": "wordpiece", "file": str(saved), "source": "trained on the training split"}
    vocab = Pieces.load(str(saved)).tokenizer.get_vocab()
    assert "image" in vocab and "biopsy" not in vocab and first["vocab_size"] == len(vocab)
    assert cli.main([*args, "--tokenizer", str(saved), "--out", str(tmp_path / "second.json")]) == 0
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["tokenizer"]["source"] == "loaded" and not (tmp_path / "second.tokenizer.json").exists()
    assert second["predictions"] == first["predictions"] and second["history"] == first["history"]
    capsys.readouterr()
    assert cli.main([*args, "--tokenizer", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such tokenizer file" in capsys.readouterr().err
