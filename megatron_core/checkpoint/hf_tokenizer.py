"""Carry a tokenizer into and out of Hugging Face directories and Megatron checkpoints.

Export writes what ``transformers.AutoTokenizer.from_pretrained`` reads: ``tokenizer.json`` plus
``tokenizer_config.json`` for a Hugging Face tokenizer or GPT-2 BPE (vocab.json/merges.txt are
converted to a fast tokenizer) and for SentencePiece, converted at export with transformers'
``SpmConverter.build_tokenizer_from_spm_proto`` (it follows the model's own normalizer, dummy-prefix
and byte-fallback settings, so it encodes as ``SentencePieceProcessor.encode``; reading the model
file needs ``protobuf``, the ``hf`` extra), with ``tokenizer.model`` beside it: the exported directory
loads with neither sentencepiece nor protobuf installed. The special ids
(bos/eos/pad, -1 = none) are the tokenizer's own; they go into ``config.json`` and
``generation_config.json`` as ``bos_token_id``/``eos_token_id``/``pad_token_id``.
"""
from __future__ import annotations

import importlib
import os
import shutil
from typing import Any

from megatron_core.tokenizer.base import NO_TOKEN, MegatronTokenizer
from megatron_core.tokenizer.build import build_tokenizer
from megatron_core.tokenizer.gpt2_bpe_tokenizer import GPT2BPETokenizer
from megatron_core.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer
from megatron_core.tokenizer.sentencepiece_tokenizer import Llama2Tokenizer, SentencePieceTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def special_ids(tokenizer: MegatronTokenizer) -> dict[str, int | None]:
    """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` of ``tokenizer`` (None where it has none)."""
    def real(value: int) -> int | None:
        return None if value == NO_TOKEN else int(value)
    return {"bos_token_id": real(tokenizer.bos), "eos_token_id": real(tokenizer.eos),
            "pad_token_id": real(tokenizer.pad)}


def has_tokenizer(path: str) -> bool:
    """True when ``path`` holds tokenizer files this module reads."""
    return bool(dir_tokenizer_flags(path))


_SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "Llama2Tokenizer")


def dir_tokenizer_flags(path: str, recorded_type: str | None = None) -> dict[str, Any]:
    """The ``--tokenizer-*`` flags that build the tokenizer saved in ``path`` (what :func:`load_dir_tokenizer`
    builds); empty when ``path`` holds none.

    A Hugging Face directory (``tokenizer.json``, or ``tokenizer.model`` with a ``tokenizer_config.json``)
    is read as Hugging Face reads it (``HuggingFaceTokenizer``: ``AutoTokenizer``'s ids, e.g. the bos that
    a Llama tokenizer puts first, which the bare SentencePiece model does not). ``recorded_type``, the
    class a checkpoint's ``model_info["tokenizer"]["type"]`` names (the converter's record of what the
    training run used), keeps a ``SentencePieceTokenizer`` or ``Llama2Tokenizer`` on its ``tokenizer.model``.
    A ``tokenizer.model`` alone is a SentencePiece model; ``vocab.json``/``merges.txt`` GPT-2 BPE."""
    spm_file, json_file = os.path.join(path, "tokenizer.model"), os.path.join(path, "tokenizer.json")
    has_config = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    if os.path.isfile(spm_file) and recorded_type in _SENTENCEPIECE_TYPES:
        return {"tokenizer_type": recorded_type, "tokenizer_model": spm_file}
    if os.path.isfile(json_file) or (os.path.isfile(spm_file) and has_config):
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": path}
    if os.path.isfile(spm_file):
        return {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": spm_file}
    if os.path.isfile(os.path.join(path, "vocab.json")):
        return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": os.path.join(path, "vocab.json"),
                "merge_file": os.path.join(path, "merges.txt")}
    return {}


def load_dir_tokenizer(path: str, recorded_type: str | None = None) -> MegatronTokenizer:
    """The tokenizer saved in ``path`` by :func:`save_tokenizer` (or by ``transformers``), as
    :func:`dir_tokenizer_flags` finds it. Raises FileNotFoundError when there is none."""
    flags = dir_tokenizer_flags(path, recorded_type)
    if not flags:
        raise FileNotFoundError(f"{path} holds no tokenizer.json, tokenizer.model or vocab.json")
    return build_tokenizer(**flags)


def _token_names(tokenizer: MegatronTokenizer, id_to_token) -> dict[str, Any]:
    names: dict[str, Any] = {}
    for key, value in (("bos_token", tokenizer.bos), ("eos_token", tokenizer.eos), ("pad_token", tokenizer.pad)):
        if value != NO_TOKEN:
            names[key] = id_to_token(value)
    return names


def save_tokenizer(tokenizer: MegatronTokenizer, path: str) -> None:
    """Write ``tokenizer`` into the directory ``path`` so that ``AutoTokenizer.from_pretrained(path)`` works.

    Raises ValueError for a tokenizer with no files (NullTokenizer).
    """
    os.makedirs(path, exist_ok=True)
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast  # noqa: PLC0415

    fast: PreTrainedTokenizerBase
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(tokenizer.model_file, os.path.join(path, "tokenizer.model"))
        spm = _sentencepiece_to_fast(tokenizer.model_file)
        if isinstance(tokenizer, Llama2Tokenizer):  # bos before every text, as Hugging Face's Llama tokenizer
            from tokenizers import processors  # noqa: PLC0415
            bos = spm.id_to_token(tokenizer.bos)
            spm.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, tokenizer.bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=spm)
    elif isinstance(tokenizer, HuggingFaceTokenizer):
        source = tokenizer.path
        json_file = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else source
        if os.path.isfile(json_file):
            fast = PreTrainedTokenizerFast(tokenizer_file=json_file)
        else:  # a directory transformers reads without a tokenizer.json (e.g. tokenizer.model + its config)
            from transformers import AutoTokenizer  # noqa: PLC0415
            fast = AutoTokenizer.from_pretrained(source, local_files_only=True)
    elif isinstance(tokenizer, GPT2BPETokenizer):
        # Built with the tokenizers library directly: transformers' GPT-2 tokenizer class changed its
        # constructor between 4.x (GPT2TokenizerFast, vocab_file=) and 5.x (GPT2Tokenizer, vocab=).
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
        bpe = Tokenizer(models.BPE.from_file(tokenizer.vocab_file, tokenizer.merge_file))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe)
    else:
        raise ValueError(f"{type(tokenizer).__name__} has no files to export; pass --tokenizer-type with a "
                         f"SentencePiece, GPT-2 BPE or Hugging Face tokenizer")
    fast.add_special_tokens(_token_names(tokenizer, fast.convert_ids_to_tokens))
    fast.save_pretrained(path)


def _sentencepiece_to_fast(model_file: str) -> Any:
    """A ``tokenizers.Tokenizer`` encoding as the SentencePiece model ``model_file`` (control pieces special)."""
    try:  # generated protobuf code: its classes are made at import time, so mypy sees none of them
        model_pb2: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")  # needs google.protobuf
    except ImportError:
        raise ValueError("exporting a SentencePiece tokenizer needs the protobuf package (pip install protobuf, "
                         "or the project's hf extra) to read the .model file") from None
    from tokenizers import AddedToken  # noqa: PLC0415
    from transformers.convert_slow_tokenizer import SpmConverter  # noqa: PLC0415

    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):  # transformers 4.x
        raise ValueError("exporting a SentencePiece tokenizer needs a transformers release with "
                         "SpmConverter.build_tokenizer_from_spm_proto (5.x); upgrade transformers")
    proto = model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    bpe = proto.trainer_spec.model_type == 2  # sentencepiece_model.proto: 1 unigram, 2 bpe
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)} if bpe else pieces
    fast = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if fast is None:
        raise ValueError(f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type} cannot be exported; "
                         f"train a bpe or unigram model")
    # unknown (2) and control (3) pieces, e.g. <unk> <s> </s>: whole tokens, never split (SpmConverter.tokenizer)
    fast.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces
                             if p.type in (2, 3)])
    return fast
