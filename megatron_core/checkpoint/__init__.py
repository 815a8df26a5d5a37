"""Checkpoint conversion between Hugging Face directories and the Megatron-LM legacy layout."""
