"""The interface every tokenizer exposes to the preprocessing tool, datasets and training."""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence

# Megatron signals "this tokenizer has no such token" with -1 rather than None so the
# value can live in integer tensors (e.g. the GPT dataset compares labels against pad).
NO_TOKEN = -1


def lone_surrogate(text: str) -> str | None:
    """Why ``text`` is not Unicode text a tokenizer can take, or None when it is.

    JSON may spell a lone UTF-16 surrogate (``"\\ud800"``, half of a pair such as ``"\\ud83d\\ude00"``);
    ``json.loads`` turns it into a ``str`` that cannot be encoded as UTF-8, which SentencePiece and the
    Hugging Face tokenizers reject with an unhelpful binding error. Returns e.g.
    ``"a lone surrogate '\\ud800' at character 5 (not Unicode text)"``.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate {text[exc.start:exc.end]!r} at character {exc.start} (not Unicode text)"
    return None


def json_sentences(key: str, value: object) -> list[str]:
    """The text under one ``--json-keys`` key of a JSONL document, as a list of sentences.

    A string is one sentence; a list of strings is Megatron-LM's sentence-split form (what its
    ``preprocess_data.py --split-sentences`` pre-pass writes), each element one sentence, which
    Megatron-LM tokenizes one by one and concatenates into the document. Raises ValueError naming
    the key (and the element) when the value is neither, or a sentence holds a lone surrogate.
    """
    if isinstance(value, str):
        sentences: list = [value]
    elif isinstance(value, list):
        sentences = value
    else:
        raise ValueError(f"key {key!r} holds {type(value).__name__}, not a string or a list of strings")
    for index, sentence in enumerate(sentences):
        where = f"key {key!r}" if isinstance(value, str) else f"key {key!r} element {index}"
        if not isinstance(sentence, str):
            raise ValueError(f"{where} holds {type(sentence).__name__}, not a string")
        if (problem := lone_surrogate(sentence)) is not None:
            raise ValueError(f"{where} holds {problem}: fix the line's JSON escapes")
    return sentences


def unique_json_keys(json_keys: Sequence[str]) -> tuple[str, ...]:
    """``--json-keys`` with each key once, in order, warning on stderr about a key given twice.

    A repeated key is one dataset (preprocess_data) or one text (train_tokenizer), read once, as
    Megatron-LM's per-key dicts make it; reading it twice would double every document.
    """
    keys = tuple(dict.fromkeys(json_keys))
    repeated = [key for key in keys if list(json_keys).count(key) > 1]
    if repeated:
        names = " ".join(repr(key) for key in repeated)
        print(f"warning: --json-keys names {names} more than once; each key is read once", file=sys.stderr)
    return keys


class MegatronTokenizer(ABC):
    """Abstract tokenizer: text <-> token ids, plus the special ids the data pipeline needs."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOD appended; the caller decides)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids this tokenizer can produce (before any padding for TP)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """The end-of-document id appended between documents."""

    @property
    def pad(self) -> int:
        """The padding id, or -1 when the tokenizer has none."""
        return NO_TOKEN

    @property
    def bos(self) -> int:
        """The beginning-of-sequence id, or -1 when the tokenizer has none."""
        return NO_TOKEN

    @property
    def eos(self) -> int:
        """The end-of-sequence id; for GPT-style tokenizers this is the EOD id."""
        return self.eod

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"
