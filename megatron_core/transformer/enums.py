"""Names shared by the transformer modules and their config."""
from __future__ import annotations

import enum


class AttnMaskType(enum.Enum):
    """How attention is masked when no explicit mask is given."""

    causal = "causal"
    no_mask = "no_mask"


class AttnBackend(enum.Enum):
    """Megatron-LM's ``--attention-backend`` values and what each runs here.

    ``flash`` uses ``torch.nn.functional.scaled_dot_product_attention`` (which picks a
    flash/memory-efficient kernel on GPUs); ``auto`` does too, except when training with attention
    dropout on the CPU, where the explicit path is faster; ``fused`` uses the explicit scaled-masked-softmax path
    with a fused softmax kernel when one is found; ``unfused`` and ``local`` use the explicit path
    with the torch softmax.
    """

    auto = "auto"
    flash = "flash"
    fused = "fused"
    unfused = "unfused"
    local = "local"

    @property
    def uses_sdpa(self) -> bool:
        """True for the backends that run PyTorch's ``scaled_dot_product_attention`` (auto, flash)."""
        return self in (AttnBackend.auto, AttnBackend.flash)
