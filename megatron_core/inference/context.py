"""KV cache for incremental decoding: per-layer key/value buffers and the number of cached positions.

Megatron-LM's ``InferenceParams`` (``megatron/core/inference_params.py``) plays the same role: each
self-attention layer appends its new keys and values at ``sequence_len_offset`` and attends over
everything cached so far. Training never builds one, so training numerics are untouched.
"""
from __future__ import annotations

import torch


class InferenceContext:
    """Key/value buffers [max_sequence_length, max_batch, groups / TP, head_dim] per layer, grown lazily.

    ``sequence_len_offset`` is the number of positions already cached; the caller advances it with
    :meth:`advance` after each forward pass over new tokens.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int) -> None:
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length
        self.sequence_len_offset = 0
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer_number: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` [s_new, b, groups, d] at the current offset; return all cached [s, b, groups, d].

        Raises ValueError when the new tokens overflow ``max_sequence_length`` or ``max_batch_size``.
        """
        s_new, b = key.shape[:2]
        start, end = self.sequence_len_offset, self.sequence_len_offset + s_new
        if end > self.max_sequence_length or b > self.max_batch_size:
            raise ValueError(f"KV cache holds {self.max_sequence_length} positions x {self.max_batch_size} "
                             f"sequences; asked for positions up to {end} x {b}")
        if layer_number not in self._cache:
            shape = (self.max_sequence_length, self.max_batch_size, *key.shape[2:])
            self._cache[layer_number] = (key.new_empty(shape), value.new_empty(shape))
        k_buf, v_buf = self._cache[layer_number]
        k_buf[start:end, :b] = key
        v_buf[start:end, :b] = value
        return k_buf[:end, :b], v_buf[:end, :b]

    def advance(self, tokens: int) -> None:
        """Mark ``tokens`` more positions as cached (call once per forward pass, after all layers)."""
        self.sequence_len_offset += tokens

    def reset(self) -> None:
        """Forget the cached positions (the buffers are kept for reuse)."""
        self.sequence_len_offset = 0
