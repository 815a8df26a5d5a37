"""Named RNG streams (Megatron-LM's CUDA RNG tracker) and the per-TP-rank seeding rule.

A leaf module: ``parallel_state`` owns a tracker and ``tensor_parallel`` forks it, so neither
imports the other for it. Two streams matter: the default one, seeded identically on every
tensor-parallel rank, for dropout on replicated activations; and the "model-parallel" stream,
seeded per TP rank, for dropout on activations split across TP ranks (attention probabilities).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_core import device

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # Megatron-LM's offset, so seeds match its runs


class RNGStatesTracker:
    """Named RNG states that ``fork`` swaps in for the duration of a block."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: set[int] = set()

    def reset(self) -> None:
        """Forget every stream and the seeds used."""
        self.states.clear()
        self.seeds.clear()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every stream's RNG state (name -> byte tensor), e.g. for activation recomputation."""
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace all streams with copies of ``states`` (the output of :meth:`get_states`)."""
        self.states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Add stream ``name`` seeded with ``seed``; ValueError when the name or the seed is already used."""
        if seed in self.seeds:
            raise ValueError(f"seed {seed} already used by another RNG stream")
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self.seeds.add(seed)
        saved = device.get_rng_state()
        device.manual_seed(seed)
        self.states[name] = device.get_rng_state()
        device.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with stream ``name``'s RNG state, saving its advanced state back afterwards."""
        if name not in self.states:
            raise RuntimeError(f"RNG stream {name!r} was not added; call model_parallel_manual_seed first")
        saved = device.get_rng_state()
        device.set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = device.get_rng_state()
            device.set_rng_state(saved)


def model_parallel_manual_seed(seed: int, tracker: RNGStatesTracker, tp_rank: int) -> None:
    """Seed the default stream with ``seed`` and the tracker's TP stream with a per-rank seed."""
    tracker.reset()
    torch.manual_seed(seed)
    device.manual_seed(seed)
    tracker.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + tp_rank)
