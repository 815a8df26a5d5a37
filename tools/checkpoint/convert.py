"""Convert GPT checkpoints between Hugging Face and Megatron-LM's layout, or re-shard one.

Runs ``megatron_core.checkpoint.convert``; ``--help`` lists the flags.
"""
import os
import sys

if __name__ == "__main__":
    # The checkout, when the library is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from megatron_core.checkpoint.convert import main

    sys.exit(main())
