"""Data, tokenizer and the built-in demo flags."""
from __future__ import annotations

import argparse
import json
from typing import Any

from megatron_core.datasets.splits import SPLIT_NAMES
from megatron_core.training.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Datasets (``--data-path``/``--mock-data``), splits, tokenizer and ``--demo``."""
    g = parser.add_argument_group("data", "datasets and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="dataset prefix(es) from tools/preprocess_data.py, optionally weighted: 0.3 A 0.7 B")
    for split in SPLIT_NAMES:
        g.add_argument(f"--{split}-data-path", nargs="*", default=None,
                       help=f"the {split} split's own prefix(es), every document of them (instead of --data-path "
                            f"and --split)")
    g.add_argument("--data-args-path", default=None,
                   help="a file holding the --data-path list (whitespace-separated), for blends too long for a "
                        "command line (Megatron-LM's flag)")
    g.add_argument("--per-split-data-args-path", default=None,
                   help='a JSON file {"train": ..., "valid": ..., "test": ...}, each the list (or string) that '
                        "--train/valid/test-data-path would take (Megatron-LM's flag)")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens, no files")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights over documents")
    g.add_argument("--data-cache-path", default=None, help="where dataset index caches go")
    g.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on predictions after an end-of-document")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="position ids restart at 0 after each end-of-document token inside a sample")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="tokens after an end-of-document token attend only to their own document (a causal, "
                        "block-diagonal [s, s] mask per sample instead of the fused causal path)")
    g.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                            "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer"])
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or Hugging Face tokenizer path")
    g.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer: N ids plus its eod id N (N+1 tokens, as Megatron-LM); with another "
                        "tokenizer an upper bound it must fit in")
    g = parser.add_argument_group("demo", "train a tiny GPT on the Python standard library's sources")
    g.add_argument("--demo", action="store_true",
                   help="build a corpus, train a tokenizer, preprocess and train on CPU; other flags override")
    g.add_argument("--demo-dir", default="demo_output", help="where the demo's data and checkpoints go")
    g.add_argument("--demo-input", default=None,
                   help="use this JSONL file ({\"text\": ...} per line) instead of the standard library corpus")
    g.add_argument("--demo-prepare-only", action="store_true", help="prepare the demo's data, then exit")


def read_data_args_files(args: argparse.Namespace) -> None:
    """Fill ``--data-path`` from ``--data-args-path`` and ``--train/valid/test-data-path`` from
    ``--per-split-data-args-path``, as Megatron-LM's ``get_blend_and_blend_per_split`` reads them (a JSON string
    value is split at whitespace; here a missing or null key is a split not given). Raises ConfigError, one line
    naming the flag and the file, for a file that cannot be read or holds no paths, and beside the flags it
    replaces."""
    if args.data_args_path is not None:
        if args.data_path:
            raise ConfigError("give --data-path or --data-args-path, not both")
        text = _read(args.data_args_path, "--data-args-path")
        args.data_path = text.split()
        if not args.data_path:
            raise ConfigError(f"--data-args-path {args.data_args_path} holds no dataset prefix; write the "
                              f"--data-path list into it (e.g. 0.3 A_text_document 0.7 B_text_document)")
    if args.per_split_data_args_path is not None:
        flags = [f"--{split}-data-path" for split in SPLIT_NAMES]
        if any(getattr(args, f"{split}_data_path") for split in SPLIT_NAMES):
            raise ConfigError(f"give {'/'.join(flags)} or --per-split-data-args-path, not both")
        per_split = _per_split_paths(args.per_split_data_args_path)
        if not any(per_split.values()):  # else the error would ask for --data-path or --mock-data
            raise ConfigError(f"--per-split-data-args-path {args.per_split_data_args_path} holds no dataset prefix; "
                              f'give "train" (and "valid", "test") the prefixes, e.g. {{"train": ["A_text_document"]}}')
        for split, paths in per_split.items():
            setattr(args, f"{split}_data_path", paths)


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc})") from None


def _per_split_paths(path: str) -> dict[str, list[str] | None]:
    """``{"train": [...], "valid": [...], "test": [...]}`` of the JSON file; a missing or null key is None."""
    where = f"--per-split-data-args-path {path}"
    keys = '"train", "valid" and "test"'
    try:
        content: Any = json.loads(_read(path, "--per-split-data-args-path"))
    except ValueError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{where} is not a JSON object with {keys} keys")
    unknown = sorted(set(content) - set(SPLIT_NAMES))
    if unknown:
        raise ConfigError(f"{where} has the key {json.dumps(unknown[0])}; the keys are {keys}")
    result: dict[str, list[str] | None] = {}
    for split in SPLIT_NAMES:
        value = content.get(split)
        if isinstance(value, str):
            value = value.split()
        if value is not None and not (isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)):
            raise ConfigError(f"{where}: {json.dumps(split)} is {json.dumps(value)}; give a list of prefixes "
                              f"(optionally weighted: [\"0.3\", \"A\", \"0.7\", \"B\"]) or one string of them")
        result[split] = None if not value else [str(v) for v in value]
    return result
