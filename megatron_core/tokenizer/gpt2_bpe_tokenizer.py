"""GPT-2 byte-level BPE tokenizer from a local vocab.json + merges.txt pair."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from typing_extensions import override

from .base import MegatronTokenizer

# GPT-2 separates documents with this token; Megatron-LM uses it as EOD.
GPT2_EOD_TOKEN = "<|endoftext|>"


def _require_file(path: str | None, flag: str, what: str) -> str:
    if not path or not os.path.isfile(path):
        raise ValueError(f"GPT2BPETokenizer {what} not found: {path!r}; pass {flag} PATH.")
    return path


class GPT2BPETokenizer(MegatronTokenizer):
    """Byte-level BPE exactly as GPT-2 does it (no prefix space); EOD is ``<|endoftext|>``."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        _require_file(vocab_file, "--vocab-file", "vocab file (vocab.json)")
        _require_file(merge_file, "--merge-file", "merge file (merges.txt)")
        self.vocab_file, self.merge_file = vocab_file, merge_file
        try:
            with open(vocab_file, encoding="utf-8") as f:
                self._encoder: dict[str, int] = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--vocab-file {vocab_file!r} is not a readable JSON vocabulary: {exc}") from None
        if GPT2_EOD_TOKEN not in self._encoder:
            raise ValueError(
                f"--vocab-file {vocab_file!r} has no {GPT2_EOD_TOKEN!r} entry, which GPT2BPETokenizer "
                "uses as EOD; add it (train with special_tokens=['<|endoftext|>'])."
            )
        from tokenizers import ByteLevelBPETokenizer

        try:
            self._bpe = ByteLevelBPETokenizer(vocab_file, merge_file, add_prefix_space=False)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(
                f"could not load --vocab-file {vocab_file!r} / --merge-file {merge_file!r}: {exc}"
            ) from None

    @override
    def tokenize(self, text: str) -> list[int]:
        # add_special_tokens=False: GPT-2 never inserts BOS/EOS itself; EOD is appended by callers.
        return self._bpe.encode(text, add_special_tokens=False).ids

    @override
    def detokenize(self, ids: Sequence[int]) -> str:
        return self._bpe.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    @override
    def vocab_size(self) -> int:
        return len(self._encoder)

    @property
    def vocab(self) -> dict[str, int]:
        """Byte-level token string -> id."""
        return dict(self._encoder)

    @property
    @override
    def eod(self) -> int:
        return self._encoder[GPT2_EOD_TOKEN]

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file}

    def __setstate__(self, state: dict) -> None:
        GPT2BPETokenizer.__init__(self, state["vocab_file"], state["merge_file"])
