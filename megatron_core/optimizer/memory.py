"""Bytes a rank holds for parameters, gradients, main parameters and optimizer state.

Measured from the tensors actually alive (each storage counted once, a released storage as 0),
not from a formula, so tests can hold the implementation to the ZeRO paper's accounting:
(2+2+K)Ψ for plain DP, 4Ψ + KΨ/Nd for ZeRO-1, 2Ψ + (2+K)Ψ/Nd for ZeRO-2 (K = 12 for
mixed-precision Adam), up to bucket padding.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from megatron_core.optimizer.optimizer import MegatronOptimizer


@dataclasses.dataclass
class MemoryFootprint:
    """Bytes per category on this rank."""

    params: int
    grads: int
    main_params: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.main_params + self.optimizer_state


class _StorageCounter:
    """Sums storage sizes, counting a storage shared by several views once."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()

    def add(self, tensors: Iterable[torch.Tensor | None]) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if storage.nbytes() == 0 or key in self.seen:
                continue
            self.seen.add(key)
            total += storage.nbytes()
        return total


def memory_footprint(model_chunks: list[torch.nn.Module], optimizer: MegatronOptimizer | None = None
                     ) -> MemoryFootprint:
    """What this rank holds now; call it between steps (after ``step()``) for the steady state."""
    counter = _StorageCounter()
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    buffers = [b for chunk in model_chunks for b in getattr(chunk, "buffers_by_dtype", [])]
    mains = [main for main, _ in optimizer.pairs] if optimizer is not None else []
    param_bytes = counter.add([b.param_data for b in buffers] + params)
    grad_bytes = counter.add([b.grad_data for b in buffers] + [b.grad_shard for b in buffers]
                             + [getattr(p, "main_grad", None) for p in params] + [p.grad for p in params]
                             + [main.grad for main in mains])
    # Model parameters were counted above, so fp32 parameters that are their own main copy add nothing.
    main_bytes = counter.add(mains)
    state_bytes = 0
    if optimizer is not None:
        state_bytes = counter.add(value for state in optimizer.inner.state.values() for value in state.values()
                                  if torch.is_tensor(value))
    return MemoryFootprint(param_bytes, grad_bytes, main_bytes, state_bytes)
