"""Data, tokenizer and the built-in demo flags."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Datasets (``--data-path``/``--mock-data``), splits, tokenizer and ``--demo``."""
    g = parser.add_argument_group("data", "datasets and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="dataset prefix(es) from tools/preprocess_data.py, optionally weighted: 0.3 A 0.7 B")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="*", default=None,
                       help=f"the {split} split's own prefix(es), every document of them (instead of --data-path "
                            f"and --split)")
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
