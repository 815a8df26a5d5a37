"""Pick the next token from last-position logits: greedy, temperature, top-k and top-p (nucleus).

Follows Megatron-LM's ``megatron/inference/text_generation/sampling.py``: temperature divides the
logits, top-k keeps the k largest, top-p keeps the smallest set of tokens whose probability sums
to at least p (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"); the rest get
-inf before a multinomial draw from a seeded ``torch.Generator``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_core.errors import ConfigError

# Megatron-LM's text generation server refuses a temperature above 100 ("temperature must be a positive
# number less than or equal to 100.0"); 0 stays allowed here (greedy).
MAX_TEMPERATURE = 100.0
# How the sampling values are named to a command-line user (Megatron-LM's flags).
FLAG_NAMES = {"temperature": "--temperature", "top_k": "--top_k", "top_p": "--top_p", "seed": "--seed"}


@dataclass
class SamplingParams:
    """``top_k`` 1 (or temperature 0) is greedy; ``top_k`` 0 and ``top_p`` 0 sample the whole vocabulary."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0

    def validate(self, names: Mapping[str, str] = FLAG_NAMES) -> None:
        """Raise ConfigError on an out-of-range value, named by ``names`` (field -> what the user typed:
        Megatron-LM's flags by default; the HTTP server passes its request fields)."""
        t, k, p, s = (names[f] for f in ("temperature", "top_k", "top_p", "seed"))
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails both
            raise ConfigError(f"{t} must be a finite number >= 0, got {self.temperature}")
        if self.temperature > MAX_TEMPERATURE:  # past float32's range the scaled logits became nan
            raise ConfigError(f"{t} must be at most {MAX_TEMPERATURE:g} (Megatron-LM's bound), "
                              f"got {self.temperature:g}")
        if self.top_k < 0:
            raise ConfigError(f"{k} must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"{p} must be in [0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**64:  # torch.Generator.manual_seed's range (raises an OverflowError past it)
            raise ConfigError(f"{s} must be in [0, 2**64), got {self.seed}")
        if self.top_k > 1 and self.top_p > 0:
            raise ConfigError(f"{k} and {p} cannot both be set (as in Megatron-LM); pick one")

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax."""
        return self.top_k == 1 or self.temperature == 0


def _filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > p
    # Keep the token that crosses p: shift the mask one to the right (the first token always stays).
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [b] (int64) from ``logits`` [b, vocab] (fp32 recommended; padded ids already -inf)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k > 1:
        logits = _filter_top_k(logits, params.top_k)
    elif params.top_p > 0:
        logits = _filter_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
