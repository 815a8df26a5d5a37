"""Layer specs for GPT-style models: local (plain torch), fused-kernel and Transformer Engine.

They share the layer structure and differ in the classes that fill it. ``get_gpt_layer_spec``
picks Transformer Engine when it imports (and a GPU is in use), else the fused spec; the fused
spec's modules fall back to torch per op when no kernel is found, so it is always safe.
"""
from __future__ import annotations

import functools
import logging

from megatron_core import device
from megatron_core.fusions.fused_layer_norm import build_norm
from megatron_core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_core.transformer import te_spec
from megatron_core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.spec import ModuleSpec
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

logger = logging.getLogger(__name__)


def _torch_norm(config, hidden_size: int, eps: float | None = None):
    return build_norm(config, hidden_size, eps, kernel=None)


def _gpt_layer_spec(norm, column, row, core_attention, qk_layernorm: bool, fused_kernels: bool = True) -> ModuleSpec:
    fused = {"fused_kernels": fused_kernels}  # RoPE, SwiGLU and bias-dropout-add kernels (kernels.py)
    return ModuleSpec(
        module=TransformerLayer, params=fused,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal, **fused},
                submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core_attention,
                                                   linear_proj=row, q_layernorm=norm if qk_layernorm else None,
                                                   k_layernorm=norm if qk_layernorm else None)),
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, params=fused, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))))


def get_gpt_layer_local_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Plain torch modules only (no kernel lookup): the reference implementation."""
    return _gpt_layer_spec(_torch_norm, ColumnParallelLinear, RowParallelLinear, DotProductAttention, qk_layernorm,
                           fused_kernels=False)


def get_gpt_layer_fused_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Norms and the attention softmax use a fused kernel where one is found, else torch."""
    return _gpt_layer_spec(build_norm, ColumnParallelLinear, RowParallelLinear, DotProductAttention, qk_layernorm)


def get_gpt_layer_te_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Transformer Engine norms and linears (core attention stays ours); needs transformer_engine."""
    te_spec.require_te()
    return _gpt_layer_spec(te_spec.TENorm, te_spec.TEColumnParallelLinear, te_spec.TERowParallelLinear,
                           DotProductAttention, qk_layernorm)


@functools.lru_cache(maxsize=1)
def _te_usable() -> bool:
    if not te_spec.HAVE_TE:
        logger.info("transformer_engine is not importable (%s); using the local/fused layer spec",
                    te_spec.TE_IMPORT_ERROR)
        return False
    return device.cuda_available()


def get_gpt_layer_spec(qk_layernorm: bool = False, use_te: bool | None = None) -> ModuleSpec:
    """The best spec on this machine: TE when usable (or ``use_te=True``), else the fused spec."""
    if use_te is None:
        use_te = _te_usable()
    return get_gpt_layer_te_spec(qk_layernorm) if use_te else get_gpt_layer_fused_spec(qk_layernorm)
