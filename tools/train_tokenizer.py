"""Train a SentencePiece tokenizer from text or JSONL files (``megatron_core.tokenizer.train_tokenizer``; ``--help`` lists the flags)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when the library is not installed
    from megatron_core.tokenizer.train_tokenizer import main

    sys.exit(main())
