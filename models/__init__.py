"""Models built from ``megatron_core`` parts: GPT (GPT-2 and Llama shapes via presets)."""
