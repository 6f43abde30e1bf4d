"""The tile-VQA tokenizer: a WordPiece trained on the training split with HuggingFace `tokenizers`.

MUMC (pengfeiliHEU/MUMC) tokenizes PathVQA questions and answers with BERT's uncased WordPiece. Its 30,522
pieces come with the BERT weights, which cannot be fetched here (the text modules start from random weights), so a
WordPiece of the same kind is trained offline on the training split's cleaned questions and answers (MUMC's
`pre_question` / `pre_answer`): BERT's normaliser (lower case, accents stripped) and pre-tokenizer (words split at
whitespace and punctuation), at most `vocab_size` pieces, "##" marking a piece that continues a word. A word the
training split never showed is written as the longest known pieces ("tumors" -> "tumor", "##s"), or as [UNK] when
one of its characters never occurred in training — it never gets an id of its own, so nothing of the validation or
test text leaks into the vocabulary.

Ids: [PAD] = 0 (padding, and the end of an answer, as the decoders expect), [UNK] = 1, [CLS] = 2 (the answer
decoder's start token, as BERT's answer decoder in MUMC starts with [CLS]). Questions carry no special token.

The trained tokenizer is saved as `tokenizers`' own JSON next to a run's results, and `Pieces.load` reads it back
to the same ids, so evaluating with a saved tokenizer needs no retraining.
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath

SPECIAL = ("[PAD]", "[UNK]", "[CLS]")
BERT_VOCAB = 30522  # bert-base-uncased's size, MUMC's tokenizer


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # a named one-line error through the CLIs (ValueError -> exit 2)
        raise ValueError("tile VQA (--format pathvqa) tokenizes with HuggingFace `tokenizers`, which is not "
                         "installed (a core dependency of gpfm_jax): pip install tokenizers") from e
    return tokenizers


@dataclasses.dataclass
class Pieces:
    """A trained WordPiece with the interface the tile-VQA path uses (ids, size, start id, encode, decode)."""

    tokenizer: object  # tokenizers.Tokenizer

    def __post_init__(self):
        got = [self.tokenizer.token_to_id(t) for t in SPECIAL]
        if got != list(range(len(SPECIAL))):
            raise ValueError(f"tokenizer: needs {', '.join(SPECIAL)} as ids 0, 1, 2 (got {got})")

    @classmethod
    def train(cls, texts, vocab_size: int = BERT_VOCAB, min_frequency: int = 0) -> "Pieces":
        """A WordPiece learned from `texts` (already cleaned) only; merges need pairs seen >= `min_frequency`."""
        tk = _tokenizers()
        tok = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        tok.decoder = tk.decoders.WordPiece()
        trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                               special_tokens=list(SPECIAL), show_progress=False)
        tok.train_from_iterator(list(texts), trainer)
        return cls(tok)

    @classmethod
    def load(cls, path) -> "Pieces":
        try:
            text = epath.Path(path).read_text()
        except FileNotFoundError:
            raise ValueError(f"{path}: no such tokenizer file") from None
        tk = _tokenizers()
        try:
            tok = tk.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a plain Exception on a malformed file
            raise ValueError(f"{path}: not a `tokenizers` JSON file ({str(e).splitlines()[0][:120]})") from None
        try:
            return cls(tok)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self) -> dict:
        """`tokenizers`' JSON as an object (write it with results.write_json_atomic; `load` reads it back)."""
        return json.loads(self.tokenizer.to_str())

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def start_id(self) -> int:
        return SPECIAL.index("[CLS]")

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def pieces(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, clean, max_length: int | None = None) -> list[int]:
        """[CLS, ids..., 0] of `clean(text)`, truncated to max_length (a truncated answer loses its end)."""
        ids = [self.start_id] + self.ids(clean(text)) + [0]
        return ids[:max_length] if max_length else ids

    def decode(self, ids) -> str:
        """The text of ids up to the first 0 (ids without the start token); an unknown word reads [UNK]. Pieces
        are joined as BERT's decoder does: "##" pieces to the previous one, others with a space (so "x-ray"
        comes back as "x - ray"; MUMC's cleaning has removed most punctuation before)."""
        ids = [int(i) for i in ids]
        return self.tokenizer.decode(ids[: ids.index(0)] if 0 in ids else ids, skip_special_tokens=False)
