"""A Megatron-style model-parallel training library that runs on CPU (gloo) and GPU (NCCL)."""
