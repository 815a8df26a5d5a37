"""Generate text from a training checkpoint or a Hugging Face directory (see megatron_core.inference)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_core.inference.text_generation_cli import main

    sys.exit(main())
