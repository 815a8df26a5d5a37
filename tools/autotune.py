"""Pick the parallel layout for pretrain_gpt.py's flags (``megatron_core.autotune.cli``; ``--help`` lists the flags)."""
import os
import sys

if __name__ == "__main__":
    # the checkout, when the library is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_core.autotune.cli import main

    sys.exit(main())
