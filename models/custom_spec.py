"""A custom layer spec picked from the command line with ``--spec``: no change to ``pretrain_gpt.py``.

QK-LayerNorm (Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters"; OLMo 2)
normalises queries and keys per head before the attention scores, which keeps the logits bounded
at high learning rates. The layer is the library's GPT layer with ``q_layernorm``/``k_layernorm``
filled in (the same layer as Megatron-LM's ``--qk-layernorm``, which is a flag here too); any other
``ModuleSpec`` (your own attention or MLP class) is picked the same way:

    python pretrain_gpt.py --spec models.custom_spec qk_norm_layer_spec --num-layers 2 ...

``MODULE`` must be importable from where ``pretrain_gpt.py`` runs (the checkout, or PYTHONPATH);
``FUNCTION`` is a ModuleSpec or a function of no arguments returning one (Megatron-LM's ``--spec``).
"""
from __future__ import annotations

from megatron_core.transformer.layer_specs import get_gpt_layer_local_spec
from megatron_core.transformer.spec import ModuleSpec


def qk_norm_layer_spec() -> ModuleSpec:
    """The GPT layer with a norm (``--normalization``) over each head's queries and keys."""
    return get_gpt_layer_local_spec(qk_layernorm=True)
