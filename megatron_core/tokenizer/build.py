"""``build_tokenizer``: pick a tokenizer by its Megatron-LM ``--tokenizer-type`` name."""
from __future__ import annotations

from typing import TypeVar

from .base import MegatronTokenizer

_T = TypeVar("_T")

# The --tokenizer-type values accepted, spelled as in Megatron-LM. GPTSentencePieceTokenizer is
# Megatron's name for the GPT flavour of SentencePiece (EOD = eos), which is what
# SentencePieceTokenizer does here too, so both names are accepted. Llama2Tokenizer puts bos first.
TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


def _need(value: _T | None, flag: str, tokenizer_type: str, hint: str) -> _T:
    """``value`` itself; ValueError naming ``flag`` when it is None or empty."""
    if value is None or value == "":
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}: {hint}")
    return value


def build_tokenizer(
    tokenizer_type: str,
    *,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
) -> MegatronTokenizer:
    """Build the tokenizer named ``tokenizer_type`` from local files (nothing is downloaded)."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        model_file = _need(tokenizer_model, "--tokenizer-model", tokenizer_type,
                           "pass the path of a SentencePiece .model file (tools/train_tokenizer.py makes one).")
        from .sentencepiece_tokenizer import Llama2Tokenizer, SentencePieceTokenizer

        kind = Llama2Tokenizer if tokenizer_type == "Llama2Tokenizer" else SentencePieceTokenizer
        return kind(model_file)
    if tokenizer_type == "GPT2BPETokenizer":
        vocab = _need(vocab_file, "--vocab-file", tokenizer_type, "pass the path of a GPT-2 vocab.json.")
        merges = _need(merge_file, "--merge-file", tokenizer_type, "pass the path of a GPT-2 merges.txt.")
        from .gpt2_bpe_tokenizer import GPT2BPETokenizer

        return GPT2BPETokenizer(vocab, merges)
    if tokenizer_type == "HuggingFaceTokenizer":
        path = _need(tokenizer_model, "--tokenizer-model", tokenizer_type,
                     "pass a local tokenizer.json file or a directory holding a saved tokenizer.")
        from .huggingface_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(path)
    if tokenizer_type == "NullTokenizer":
        num_ids = _need(vocab_size, "--vocab-size", tokenizer_type, "pass the number of ids (EOD becomes that number).")
        from .null_tokenizer import NullTokenizer

        return NullTokenizer(num_ids)
    raise ValueError(
        f"unknown --tokenizer-type {tokenizer_type!r}; choose one of: {', '.join(TOKENIZER_TYPES)}."
    )

