"""Megatron-LM's interactive client for tools/run_text_generation_server.py (see megatron_core.inference.client)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_core.inference.client import main

    sys.exit(main())
