"""Model classes built from ``megatron_core`` parts: ``gpt.GPTModel`` and the GPT-2/Llama family configs."""
