"""A Hugging Face tokenizer loaded from local files only (tokenizer.json, or a saved directory)."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from .base import NO_TOKEN, MegatronTokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

# When no tokenizer_config.json names the special tokens, these common spellings are tried in
# order; the first one present in the vocabulary wins.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json stores either "</s>" or {"content": "</s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_special_tokens(directory: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        for key in ("eos_token", "bos_token", "pad_token"):
            name = _token_name(config.get(key))
            if name is not None:
                names[key] = name
    return names


class HuggingFaceTokenizer(MegatronTokenizer):
    """Tokenizes with a local ``tokenizer.json`` (or saved transformers directory); never downloads.

    ``tokenize`` adds the tokenizer's own special tokens (e.g. a Llama BOS), as Megatron-LM's
    HuggingFaceTokenizer does; ``eod`` is the tokenizer's eos token.
    """

    def __init__(self, path: str, add_special_tokens: bool = True) -> None:
        if not path or not os.path.exists(path):
            raise ValueError(
                f"HuggingFace tokenizer path not found: {path!r}; pass --tokenizer-model with a local "
                "tokenizer.json file or a directory holding one (hub downloads are not done)."
            )
        self.path, self.add_special_tokens = path, add_special_tokens
        self._fast: Tokenizer | None = None  # tokenizers.Tokenizer, when a tokenizer.json is available
        # transformers tokenizer, for saved directories without tokenizer.json
        self._hf: PreTrainedTokenizerBase | None = None
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        json_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if os.path.isfile(json_file):
            from tokenizers import Tokenizer

            try:
                self._fast = Tokenizer.from_file(json_file)
            except Exception as exc:  # tokenizers raises a bare Exception on malformed files
                if json_file.endswith(".model"):  # a SentencePiece model: its bytes are no JSON
                    raise ValueError(
                        f"--tokenizer-model {json_file!r} is a SentencePiece model, not a tokenizer.json; pass its "
                        f"directory (with tokenizer_config.json, read as transformers reads it) or --tokenizer-type "
                        f"SentencePieceTokenizer") from None
                raise ValueError(f"--tokenizer-model {json_file!r} is not a valid tokenizer.json: {exc}") from None
            vocab = self._fast.get_vocab(with_added_tokens=True)
            names = _read_special_tokens(directory)
            self._eos = self._pick(vocab, names.get("eos_token"), _EOS_CANDIDATES)
            self._bos = self._pick(vocab, names.get("bos_token"), _BOS_CANDIDATES)
            self._pad = self._pick(vocab, names.get("pad_token"), _PAD_CANDIDATES)
            self._size = self._fast.get_vocab_size(with_added_tokens=True)
        else:
            self._load_transformers(path)
        if self._eos == NO_TOKEN:
            raise ValueError(
                f"--tokenizer-model {path!r} defines no end-of-document (eos) token; add eos_token to "
                "its tokenizer_config.json."
            )

    @staticmethod
    def _pick(vocab: dict[str, int], configured: str | None, candidates: Sequence[str]) -> int:
        for name in ((configured,) if configured else ()) + tuple(candidates):
            if name in vocab:
                return vocab[name]
        return NO_TOKEN

    def _load_transformers(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ValueError(f"could not load a tokenizer from --tokenizer-model {path!r}: {exc}") from None
        self._hf = hf
        as_id = lambda value: NO_TOKEN if value is None else int(value)  # noqa: E731
        self._eos, self._bos, self._pad = as_id(hf.eos_token_id), as_id(hf.bos_token_id), as_id(hf.pad_token_id)
        self._size = len(hf)

    def _transformers(self) -> PreTrainedTokenizerBase:
        # Set by _load_transformers whenever no tokenizer.json was found (i.e. self._fast is None).
        if self._hf is None:
            raise RuntimeError(
                f"HuggingFaceTokenizer({self.path!r}) has neither a tokenizer.json nor a transformers tokenizer"
            )
        return self._hf

    @override
    def tokenize(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=self.add_special_tokens).ids
        return self._transformers()(text, add_special_tokens=self.add_special_tokens)["input_ids"]

    @override
    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        text = self._transformers().decode(ids, skip_special_tokens=False)
        # decode() is typed str | list[str] (the list is for batched input); a flat id list gives a str.
        if not isinstance(text, str):
            raise TypeError(f"HuggingFaceTokenizer({self.path!r}).decode returned {type(text).__name__}, not str")
        return text

    @property
    @override
    def vocab_size(self) -> int:
        return self._size

    @property
    @override
    def eod(self) -> int:
        return self._eos

    @property
    @override
    def pad(self) -> int:
        return self._pad

    @property
    @override
    def bos(self) -> int:
        return self._bos

    def __getstate__(self) -> dict:
        return {"path": self.path, "add_special_tokens": self.add_special_tokens}

    def __setstate__(self, state: dict) -> None:
        HuggingFaceTokenizer.__init__(self, state["path"], state["add_special_tokens"])
