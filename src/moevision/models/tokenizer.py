"""A word-level tokenizer for the small vision-language models (no downloads, no merges).

Words and punctuation marks are tokens (``"what color is it?"`` -> ``what color is it ?``). The
vocabulary is built from training text, stored in the model config (so ``save_pretrained`` keeps it
next to the weights) and fixed afterwards; unknown words map to ``<unk>``. Case is kept (MCQ option
letters are upper case, the easy-VQA and ShapeWorld templates are lower case).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

PAD, UNK, EOS, SEP = "<pad>", "<unk>", "<eos>", "<sep>"
SPECIALS = (PAD, UNK, EOS, SEP)  # ids 0..3, always in this order
_WORD = re.compile(r"[A-Za-z0-9_']+|[^\sA-Za-z0-9_']")


def split_words(text: str) -> list[str]:
    return _WORD.findall(text)


class WordTokenizer:
    def __init__(self, vocab: list[str]):
        if list(vocab[:len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {list(vocab[:4])}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("the vocabulary has repeated words")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.eos_id, self.sep_id = (self.index[s] for s in SPECIALS)

    @classmethod
    def build(cls, texts: Iterable[str], *, min_count: int = 1) -> "WordTokenizer":
        """Vocabulary = the specials, then every word seen ``min_count`` times, sorted (deterministic)."""
        counts = Counter(w for t in texts for w in split_words(t))
        words = sorted(w for w, c in counts.items() if c >= min_count and w not in SPECIALS)
        return cls(list(SPECIALS) + words)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in split_words(text)]

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if i in (self.pad_id, self.sep_id, self.eos_id):
                continue
            words.append(self.vocab[i] if 0 <= i < len(self.vocab) else UNK)
        return " ".join(words)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in split_words(text) if w not in self.index]
