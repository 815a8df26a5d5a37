"""SentencePiece (.model file) tokenizer with GPT semantics: EOD is the model's </s>."""
from __future__ import annotations

import os
from collections.abc import Sequence

from typing_extensions import override

from .base import NO_TOKEN, MegatronTokenizer


class SentencePieceTokenizer(MegatronTokenizer):
    """Wraps a SentencePiece model; ``eod`` is its eos id, ``pad`` its pad id (or -1)."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        if model_file and os.path.isdir(model_file):
            raise ValueError(
                f"--tokenizer-model {model_file!r} is a directory; pass its tokenizer.model file, or "
                f"--tokenizer-type HuggingFaceTokenizer to tokenize as Hugging Face reads the directory (a Llama "
                f"tokenizer's bos included)"
            )
        if not model_file or not os.path.isfile(model_file):
            raise ValueError(
                f"SentencePiece model file not found: {model_file!r}; pass --tokenizer-model "
                "PATH.model (train one with tools/train_tokenizer.py)."
            )
        self.model_file = model_file
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except RuntimeError:  # "could not parse ModelProto": another kind of file (e.g. a tokenizer.json)
            raise ValueError(
                f"--tokenizer-model {model_file!r} is not a SentencePiece .model file; pass one (train one with "
                "tools/train_tokenizer.py), or the --tokenizer-type that reads this file"
            ) from None
        if self._sp.eos_id() < 0:
            # Without an eos piece there is no id to separate documents with.
            raise ValueError(
                f"SentencePiece model {model_file!r} has no eos piece (eos_id=-1), so it has no "
                "EOD id; pass a --tokenizer-model trained with an eos piece."
            )

    @override
    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    @override
    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    @override
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        """Piece -> id."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    @override
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    @override
    def pad(self) -> int:
        pad_id = self._sp.pad_id()
        return pad_id if pad_id >= 0 else NO_TOKEN

    @property
    @override
    def bos(self) -> int:
        bos_id = self._sp.bos_id()
        return bos_id if bos_id >= 0 else NO_TOKEN

    # The processor is a C++ object; rebuild it from the file when sent to worker processes.
    def __getstate__(self) -> dict:
        return {"model_file": self.model_file}

    def __setstate__(self, state: dict) -> None:
        SentencePieceTokenizer.__init__(self, state["model_file"])


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's ``Llama2Tokenizer``: SentencePiece with the bos id before every tokenized text
    (its ``tokenize(s, bos=True, eos=False)``); EOD is eos, as above. Raises ValueError for a model
    without a bos piece."""

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        if self._sp.bos_id() < 0:
            raise ValueError(f"--tokenizer-type Llama2Tokenizer puts the bos piece before every text, but "
                             f"{model_file!r} has none (bos_id=-1); pass --tokenizer-type SentencePieceTokenizer")

    @override
    def tokenize(self, text: str) -> list[int]:
        return [self._sp.bos_id(), *self._sp.encode(text, out_type=int)]

    def __setstate__(self, state: dict) -> None:
        Llama2Tokenizer.__init__(self, state["model_file"])
