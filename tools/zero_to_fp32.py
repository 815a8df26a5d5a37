"""Consolidate an engine checkpoint into fp32 safetensors or a Hugging Face folder.

``megatron_core.engine.consolidate``; ``--help`` lists the flags.
"""
import os
import sys

if __name__ == "__main__":
    # the checkout, when the library is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_core.engine.consolidate import main

    sys.exit(main())
