"""Tokenize JSONL into Megatron-LM's .bin/.idx indexed dataset.

Runs ``megatron_core.datasets.preprocess_data``; ``--help`` lists the flags.
"""
import os
import sys

if __name__ == "__main__":
    # The checkout, when the library is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_core.datasets.preprocess_data import main

    sys.exit(main())
