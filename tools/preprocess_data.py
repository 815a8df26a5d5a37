"""Tokenize JSONL into Megatron-LM's .bin/.idx indexed dataset (``megatron_core.datasets.preprocess_data``; ``--help`` lists the flags)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when the library is not installed
    from megatron_core.datasets.preprocess_data import main

    sys.exit(main())
