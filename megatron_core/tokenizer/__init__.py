"""Tokenizers with Megatron-LM's names and interface (``tokenize``/``detokenize``/``eod``/``pad``)."""
from .base import NO_TOKEN, MegatronTokenizer
from .build import TOKENIZER_TYPES, build_tokenizer
from .null_tokenizer import NullTokenizer

__all__ = [
    "NO_TOKEN",
    "MegatronTokenizer",
    "NullTokenizer",
    "TOKENIZER_TYPES",
    "build_tokenizer",
]
