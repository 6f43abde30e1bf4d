"""Word tokenizers of the reference codes, rebuilt from their documented behaviour (training split only).

- HistGen (dddavid4real/HistGen, `clean_report_pathology`): newlines to spaces, runs of "_" / double spaces /
  ".." collapsed by a fixed number of passes, list numbering "1. " dropped and " 2. " .. " 5. " turned into
  sentence ends, lower-cased, split into sentences at ". "; in each sentence the quote, slash, backslash and
  apostrophe are deleted and then every character of the class [.,?;*!%^&_+():-[]{}] — where ":-[" is a range, so
  also < = > ? @ — is deleted; sentences are joined by " . " and the report ends with " .". Empty sentences are
  kept (HistGen's emptiness test compares a string with a list and never fires), which yields ". ." pairs.
- WSI-VQA (cpystan/WSI-VQA, `clean_report_brca`): like HistGen but "?" becomes a space, the class is
  [#,?;*!^&_+():-[]{}] and its characters become spaces (not deleted), "/" is kept, and no final " .".

Vocabulary (both): the words seen at least `min_count` times in the training texts plus "<unk>" (and "<bos>" for
W2T), sorted, numbered from 1; id 0 is start, end and padding for HistGen (a report is [0, ids..., 0]) and end /
padding for W2T (which starts with <bos>). HistGen builds its vocabulary from the train split; WSI-VQA's code
reads every split's JSON, which leaks test words into the vocabulary: here only the train split is used.
"""

from __future__ import annotations

import collections
import dataclasses
import re

_HISTGEN_CLASS = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_WSIVQA_CLASS = re.compile(r"[#,?;*!^&_+():-\[\]{}]")


def _passes(text: str, old: str, new: str, times: int) -> str:
    for _ in range(times):
        text = text.replace(old, new)
    return text


def clean_report(report: str) -> str:
    """HistGen's pathology report cleaning; the result is space-separated tokens ending in " ."."""
    t = _passes(report.replace("\n", " "), "__", "_", 7)
    t = _passes(t, "  ", " ", 6)
    t = _passes(t, "..", ".", 8)
    t = t.replace("1. ", "")
    for k in "2345":
        t = t.replace(f". {k}. ", ". ")
    for k in "2345":
        t = t.replace(f" {k}. ", ". ")
    sentences = t.strip().lower().split(". ")
    cleaned = []
    for s in sentences:
        s = s.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
        cleaned.append(_HISTGEN_CLASS.sub("", s))
    return " . ".join(cleaned) + " ."


def clean_vqa_text(text: str) -> str:
    """WSI-VQA's question / answer cleaning."""
    t = _passes(text.replace("\n", " "), "  ", " ", 3).replace("?", " ")
    sentences = (t.strip().lower() + " ").split(". ")
    cleaned = []
    for s in sentences:
        s = s.replace('"', "").replace("\\", "").replace("'", "").strip().lower()
        cleaned.append(_WSIVQA_CLASS.sub(" ", s).replace("  ", " "))
    return " . ".join(cleaned)


@dataclasses.dataclass
class WordVocab:
    """Sorted word list numbered from 1 (0 = pad / end, and start when `bos` is None)."""

    words: list[str]
    bos: str | None = None  # "<bos>" for W2T; None: sequences start with 0 (HistGen)

    def __post_init__(self):
        self.index = {w: i + 1 for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts, clean, min_count: int, with_bos: bool = False) -> "WordVocab":
        counts = collections.Counter(tok for t in texts for tok in clean(t).split())
        words = [w for w, c in counts.items() if c >= min_count] + ["<unk>"] + (["<bos>"] if with_bos else [])
        return cls(sorted(words), "<bos>" if with_bos else None)

    @property
    def size(self) -> int:
        """Number of ids including 0."""
        return len(self.words) + 1

    @property
    def start_id(self) -> int:
        return self.index[self.bos] if self.bos else 0

    def encode_tokens(self, tokens: list[str]) -> list[int]:
        unk = self.index["<unk>"]
        return [self.index.get(t, unk) for t in tokens]

    def encode(self, text: str, clean, max_length: int | None = None) -> list[int]:
        """[start, ids..., 0] truncated to max_length (as HistGen: a truncated report loses its end)."""
        ids = [self.start_id] + self.encode_tokens(clean(text).split()) + [0]
        return ids[:max_length] if max_length else ids

    def decode(self, ids) -> list[str]:
        """Tokens up to the first 0 (ids without the start token)."""
        out = []
        for i in ids:
            i = int(i)
            if i == 0:
                break
            out.append(self.words[i - 1])
        return out
