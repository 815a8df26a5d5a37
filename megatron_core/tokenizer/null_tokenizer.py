"""A tokenizer for already-tokenized text: the input is whitespace-separated integer ids."""
from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import override

from .base import MegatronTokenizer


class NullTokenizer(MegatronTokenizer):
    """Whitespace-separated integers in, the same integers out; EOD is one id past ``vocab_size``.

    As in Megatron-LM, ``--vocab-size V`` means V ordinary ids (0..V-1) plus the EOD id V,
    so ``tokenizer.vocab_size == V + 1`` and ``tokenizer.eod == tokenizer.vocab_size - 1``.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(
                f"NullTokenizer needs a positive vocabulary size, got {vocab_size!r}; "
                "pass --vocab-size N."
            )
        self._num_plain_ids = int(vocab_size)

    @override
    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(piece) for piece in text.split()]
        except ValueError as exc:
            raise ValueError(f"NullTokenizer input must be whitespace-separated integers: {exc}") from None
        # Out-of-range ids would silently index past the embedding table much later.
        for token in ids:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"NullTokenizer id {token} is outside [0, {self.vocab_size})")
        return ids

    @override
    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    @override
    def vocab_size(self) -> int:
        return self._num_plain_ids + 1

    @property
    @override
    def eod(self) -> int:
        return self._num_plain_ids
