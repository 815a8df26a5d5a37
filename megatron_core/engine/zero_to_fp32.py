#!/usr/bin/env python
"""DeepSpeed's ``zero_to_fp32.py``, which ``engine.save_checkpoint`` copies into the save directory.

Run from anywhere, with DeepSpeed's command line: ``python SAVE_DIR/zero_to_fp32.py SAVE_DIR OUTPUT_DIR``
(from the save directory: ``python zero_to_fp32.py . OUTPUT_DIR``) writes the checkpoint's fp32 weights,
exactly, for any ZeRO stage, DP and AutoTP size; ``--help`` lists the flags
(:func:`megatron_core.engine.consolidate.main`, also ``tools/zero_to_fp32.py`` in the checkout).

The copy lives outside the project, so it holds no code of its own: it needs the ``megatron_core``
package (the project installed with pip) and says so in one line, exit status 2, when it is missing.
"""
import sys


def main() -> int:
    """:func:`megatron_core.engine.consolidate.main` on this command line; 2 when it cannot be imported."""
    try:
        from megatron_core.engine.consolidate import main as consolidate
    except ImportError as exc:  # the project, or a package it needs (torch), is not installed in this Python
        print(f"error: zero_to_fp32.py needs the megatron_core package, which this Python cannot import ({exc}): "
              f"pip install the project that wrote the checkpoint (pip install <its checkout>) and run it again")
        return 2
    return consolidate()


if __name__ == "__main__":
    sys.exit(main())
