"""Serve Megatron-LM's PUT /api text generation endpoint (see megatron_core.inference.server)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_core.inference.server import main

    sys.exit(main())
