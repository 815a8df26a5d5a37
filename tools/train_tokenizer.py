"""Train a SentencePiece tokenizer from text or JSONL files.

Runs ``megatron_core.tokenizer.train_tokenizer``; ``--help`` lists the flags.
"""
import os
import sys

if __name__ == "__main__":
    # The checkout, when the library is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_core.tokenizer.train_tokenizer import main

    sys.exit(main())
