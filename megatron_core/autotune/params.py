"""Exact per-rank parameter lists of the GPT model the framework builds, without building it.

Mirrors ``megatron_core.models.gpt.GPTModel`` with the default layer spec: names, element counts and
registration order of every parameter of one (virtual) pipeline chunk on one TP rank, with the
``shared_embedding`` flag of tied embeddings held on separate first and last stages. Column-parallel
weights and biases are split over TP, row-parallel weights along their input, row-parallel biases,
norms and position embeddings are replicated. ``tests/test_autotune_memory.py`` checks this against
models built on real process groups.
"""
from __future__ import annotations

import dataclasses

from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.pipeline_parallel.layer_split import layer_range


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter of a chunk: its name in ``named_parameters()``, element count, and whether it is
    the tied embedding copy that gets its own bucket under the distributed optimizer."""

    name: str
    numel: int
    shared_embedding: bool = False


def layer_params(spec: ModelSpec, tp: int, index: int) -> list[ParamInfo]:
    """Parameters of one transformer layer's TP shard, named as layer ``index`` of its chunk."""
    c = spec.config
    h, ffn = c.hidden_size, spec.ffn_hidden_size
    qkv = (c.query_projection_size + 2 * c.kv_projection_size) // tp
    fc1 = ffn * (2 if c.gated_linear_unit else 1) // tp
    norm = ["weight"] if c.normalization == "RMSNorm" else ["weight", "bias"]
    prefix = f"decoder.layers.{index}."
    out = [ParamInfo(f"{prefix}input_layernorm.{n}", h) for n in norm]
    out.append(ParamInfo(f"{prefix}self_attention.linear_qkv.weight", qkv * h))
    if c.qkv_bias:
        out.append(ParamInfo(f"{prefix}self_attention.linear_qkv.bias", qkv))
    out.append(ParamInfo(f"{prefix}self_attention.linear_proj.weight", h * c.query_projection_size // tp))
    if c.add_bias_linear:
        out.append(ParamInfo(f"{prefix}self_attention.linear_proj.bias", h))
    out += [ParamInfo(f"{prefix}pre_mlp_layernorm.{n}", h) for n in norm]
    out.append(ParamInfo(f"{prefix}mlp.linear_fc1.weight", fc1 * h))
    if c.add_bias_linear:
        out.append(ParamInfo(f"{prefix}mlp.linear_fc1.bias", fc1))
    out.append(ParamInfo(f"{prefix}mlp.linear_fc2.weight", h * ffn // tp))
    if c.add_bias_linear:
        out.append(ParamInfo(f"{prefix}mlp.linear_fc2.bias", h))
    return out


def chunk_params(spec: ModelSpec, layout: Layout, pp_rank: int, vp_stage: int | None = None) -> list[ParamInfo]:
    """Parameters of the chunk that rank ``pp_rank`` holds as virtual stage ``vp_stage``, in
    ``named_parameters()`` order. Raises ValueError (from the layer split) when layers don't divide."""
    c, tp = spec.config, layout.tp
    h, vocab = c.hidden_size, spec.padded_vocab(tp)
    counts = c.layer_counts(layout.pp, layout.vpp)
    _, count = layer_range(counts, layout.pp, pp_rank, vp_stage)
    vp = vp_stage or 0
    first = pp_rank == 0 and vp == 0
    last = pp_rank == layout.pp - 1 and vp == (layout.vpp or 1) - 1
    tied = c.share_embeddings_and_output_weights
    out: list[ParamInfo] = []
    if first:
        out.append(ParamInfo("embedding.word_embeddings.weight", vocab // tp * h, shared_embedding=tied and not last))
        if c.position_embedding_type == "learned_absolute":
            out.append(ParamInfo("embedding.position_embeddings.weight", spec.max_position_embeddings * h))
    for i in range(count):
        out += layer_params(spec, tp, i)
    if last:
        norm = ["weight"] if c.normalization == "RMSNorm" else ["weight", "bias"]
        out += [ParamInfo(f"decoder.final_layernorm.{n}", h) for n in norm]
        if not (tied and first):
            out.append(ParamInfo("output_layer.weight", vocab // tp * h, shared_embedding=tied))
    return out


def rank_chunks(spec: ModelSpec, layout: Layout, pp_rank: int) -> list[list[ParamInfo]]:
    """Every chunk of pipeline rank ``pp_rank`` (one per virtual stage)."""
    stages: list[int | None] = [None] if layout.vpp is None else list(range(layout.vpp))
    return [chunk_params(spec, layout, pp_rank, vp) for vp in stages]


def total_parameters(spec: ModelSpec) -> int:
    """Parameters of the whole model counted once (tied embeddings once), padded vocabulary at TP 1."""
    return sum(p.numel for p in chunk_params(spec, Layout(), 0))
