"""Text generation from a GPTModel: KV cache, sampling, batched generation, checkpoint loading, HTTP server."""
from megatron_core.inference.context import InferenceContext
from megatron_core.inference.generation import GenerationOutput, generate
from megatron_core.inference.sampling import SamplingParams, sample

__all__ = ["GenerationOutput", "InferenceContext", "SamplingParams", "generate", "sample"]
