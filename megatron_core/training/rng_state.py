"""Capture and restore every RNG a training step draws from, in a ``weights_only``-loadable form.

Python's ``random``, NumPy's global generator, torch's CPU generator, the device generator
(through ``megatron_core.device``) and the tensor-parallel tracker's named streams. NumPy's state
array is stored as a tensor because ``torch.load(weights_only=True)`` refuses NumPy arrays.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from megatron_core import device
from megatron_core.tensor_parallel.random import RNGStatesTracker


def get_rng_state(tracker: RNGStatesTracker) -> dict[str, Any]:
    """This rank's RNG states (Megatron-LM's key names)."""
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # only a non-MT19937 global generator gives the dict form
        raise ValueError("NumPy's global generator is not MT19937; its state cannot be saved in the legacy form")
    kind, keys, pos, has_gauss, cached = np_state
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": device.get_rng_state(),  # the device generator; the CPU one without CUDA
        "rng_tracker_states": tracker.get_states(),
    }


def set_rng_state(state: dict[str, Any], tracker: RNGStatesTracker) -> None:
    """Restore a state taken with :func:`get_rng_state`."""
    version, internal, gauss = state["random_rng_state"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["np_rng_state"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_rng_state"])
    device.set_rng_state(state["cuda_rng_state"])
    tracker.set_states(state["rng_tracker_states"])
