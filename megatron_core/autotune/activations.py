"""Activation bytes a rank keeps for backward: per layer, per pipeline stage, and the peak.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1)
count ``sbh(34 + 5as/h)`` bytes per layer for fp16 at TP 1. Here every term is a tensor this
implementation saves (found with ``torch.autograd.graph.saved_tensors_hooks``; the test
tests/test_autotune_activations.py holds the formula to that count), in units of ``B`` bytes per
activation element (4 for fp32 on the CPU, where the paper's 2 becomes 4) and ``r`` = sbh, divided
by TP under sequence parallelism:

- residual stream, sharded under SP: the two norms' inputs, the layer input and the residual sum (``2rB``,
  ``8r`` with ``--fp32-residual-connection``, whose norms also keep fp32 copies of their low-precision
  weights), their statistics (``s b`` per statistic) and RMSNorm's normalized ``x`` (:func:`norm_bytes`:
  on the CPU RMSNorm keeps an fp32 copy of a 16-bit input instead of the input, LayerNorm 16-bit
  statistics); hidden dropout masks, bool (``2r`` bytes);
- linear inputs, gathered under SP: the two norm outputs (``2sbhB``); fc2's input and the
  activation's input (``2 s b ffn / t``; SwiGLU ``4 s b ffn / t`` as torch ops, ``3 s b ffn / t``
  with a fused kernel, which keeps no silu(gate));
- attention: the fused QKV output (``sb(q + 2kv)/t``), then either PyTorch's SDPA (output and
  log-sum-exp) or the explicit path (softmax output ``(a/t)s^2 b``, its dropped copy (with no
  dropout, the copy cast from an fp32 softmax of fp16/bf16 scores), and the context copy; ``s^2`` is
  ``(C+1)/2C s^2`` for the C query blocks of the causal path without a fused softmax kernel, which
  keeps no dropout mask; the full-score path keeps it, bool); selective recompute keeps only QKV and
  the context. RoPE's torch path on 16-bit q and k keeps its own copies of cos and sin
  (:func:`rope_copy_bytes`).
- with a document mask (``--reset-attention-mask``, ``ModelSpec.document_mask``) the explicit path
  computes all ``s^2`` scores (no causal blocks); once per micro batch and model chunk (every chunk
  builds it) either the bool mask (``b s^2`` bytes) is kept, by the explicit path's masked softmax and by
  the recompute checkpoints, and/or, under SDPA, its additive form in the activations' dtype
  (``b s^2 B``), which the chunk's layers outside checkpoints share (``SharedAdditiveMask``; one copy per
  layer before): all of them without recompute, those past block's checkpointed ones under full recompute
  (:func:`document_mask_bytes`); a full-recompute replay makes it again for its group.

Full recompute keeps the input of every checkpointed group of layers and rebuilds one group's activations
in backward (:func:`chunk_activation_bytes`: ``--recompute-method`` uniform or block, ``--recompute-num-layers``).
"""
from __future__ import annotations

import dataclasses

from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.transformer.dot_product_attention import causal_blocks


def stream_bytes(spec: ModelSpec) -> int:
    """Bytes per element of the residual stream: 4 with ``--fp32-residual-connection``
    (``TransformerConfig.fp32_residual_connection``: the embedding casts it up, the layers add in fp32),
    else the activations' ``bytes_per_param``."""
    return 4 if spec.config.fp32_residual_connection else spec.bytes_per_param


def fp32_norm_weight_bytes(spec: ModelSpec) -> int:
    """Bytes one norm keeps of its weights' fp32 copies when it normalises the fp32 residual stream with
    low-precision weights (``fused_layer_norm``'s fp32 path; LayerNorm: weight and bias, RMSNorm: weight),
    else 0."""
    if stream_bytes(spec) == spec.bytes_per_param:
        return 0
    return (1 if spec.config.normalization == "RMSNorm" else 2) * spec.config.hidden_size * 4


def norm_bytes(spec: ModelSpec, layout: Layout, on_cpu: bool = True) -> int:
    """Bytes one norm keeps for backward per microbatch on one rank besides its output (the next linear's
    input, counted there): its input or an fp32 copy of it, its statistics, RMSNorm's normalized ``x``, and
    the fp32 copies of low-precision weights on the fp32 residual stream (:func:`fp32_norm_weight_bytes`).

    On the CPU (the torch path, measured by tests/test_autotune_activations.py in fp32, bf16 and fp16): LayerNorm
    keeps its input and the mean and rstd in the input's dtype (PyTorch's CPU kernel); RMSNorm normalises
    an fp32 copy of its input (``x.float()``, the input itself when fp32) and keeps that copy, the fp32
    rstd and ``x * rstd`` in the residual stream's dtype (cast back before the low-precision weight
    multiplies it, or fp32 when the stream is). On a GPU a fused kernel is expected, counted as the
    input, fp32 statistics (LayerNorm: mean and rstd, RMSNorm: rstd) and RMSNorm's ``x * rstd`` in the
    params' dtype.
    """
    c = spec.config
    s, b, h = spec.seq_length, layout.micro_batch_size, c.hidden_size
    shard = layout.tp if layout.sequence_parallel else 1
    r, rows, S, B = s * b * h // shard, s * b // shard, stream_bytes(spec), spec.bytes_per_param
    rms = c.normalization == "RMSNorm"
    if not on_cpu:
        kept = r * S + (1 if rms else 2) * rows * 4 + (r * B if rms else 0)
    elif rms:
        kept = r * 4 + rows * 4 + r * S
    else:
        kept = r * S + 2 * rows * S
    return kept + fp32_norm_weight_bytes(spec)


def rope_copy_bytes(spec: ModelSpec, layout: Layout, on_cpu: bool = True) -> int:
    """Bytes of the cos/sin copies RoPE's torch path keeps per layer: cast from the fp32 tables to a
    low-precision q and k, once each (4 tensors [s, b, 1, rotary_dim]; under SP too, as q and k cover the
    whole sequence). In fp32 the layers share the model's tables; the GPU's fused kernel reads them as
    they are. 0 without RoPE."""
    c = spec.config
    if c.position_embedding_type != "rope" or not on_cpu or spec.bytes_per_param == 4:
        return 0
    return 4 * spec.seq_length * layout.micro_batch_size * c.rotary_dim * spec.bytes_per_param


def _uses_sdpa(spec: ModelSpec, on_cpu: bool) -> bool:
    """The core-attention path ``DotProductAttention._use_sdpa`` picks while training."""
    backend = spec.config.attention_backend
    if backend == "flash":
        return True
    return backend == "auto" and not (on_cpu and spec.config.attention_dropout > 0)


def _swiglu_elements(spec: ModelSpec, layout: Layout, on_cpu: bool) -> int:
    """SwiGLU's kept tensors in units of [s, b, ffn / t]: fc1's output [gate; up] and fc2's input (3),
    plus silu(gate) (4) when SwiGLU runs as torch ops. A fused kernel keeps only its input: Triton's on
    a GPU (expected there, as the softmax kernel is) and, on the CPU, torch.compile's for fp32 and bf16
    inputs (``compiled.FUSED_DTYPES``: ``config.params_dtype``) of ``compiled.MIN_NUMEL`` elements or more
    where a C++ compiler is found."""
    if not on_cpu:
        return 3
    from megatron_core.fusions import compiled  # noqa: PLC0415

    numel = spec.seq_length * layout.micro_batch_size * 2 * spec.ffn_hidden_size // layout.tp
    fused = spec.config.params_dtype in compiled.FUSED_DTYPES and numel >= compiled.MIN_NUMEL
    return 3 if fused and compiled.compiled_fusions_enabled() else 4


def layer_activation_bytes(spec: ModelSpec, layout: Layout, on_cpu: bool = True) -> int:
    """Bytes one transformer layer keeps for backward per microbatch, on one rank."""
    c = spec.config
    s, b, h, t = spec.seq_length, layout.micro_batch_size, c.hidden_size, layout.tp
    B = spec.bytes_per_param
    shard = t if layout.sequence_parallel else 1
    r, S = s * b * h // shard, stream_bytes(spec)
    if layout.recompute == "full":
        return r * S
    masks = 2 * r if c.hidden_dropout > 0 else 0
    # the two norms (their inputs: the layer input and the residual sum), and their outputs, the inputs of
    # the two column-parallel linears (QKV, fc1): under SP only the local shard is kept (re-gathered in
    # backward, as Megatron-LM), so [s/t, b, h] each.
    total = 2 * norm_bytes(spec, layout, on_cpu) + masks + 2 * r * B
    ffn = s * b * spec.ffn_hidden_size // t
    total += (_swiglu_elements(spec, layout, on_cpu) if c.gated_linear_unit else 2) * ffn * B
    return total + _attention_bytes(spec, layout, on_cpu) + rope_copy_bytes(spec, layout, on_cpu)


def _qk_norm_bytes(spec: ModelSpec, layout: Layout, on_cpu: bool) -> tuple[int, bool]:
    """(bytes ``--qk-layernorm``'s two norms keep besides their inputs and outputs, whether they keep their
    inputs): per head row their statistics (LayerNorm: mean and rstd in the input's dtype on the CPU;
    RMSNorm: the fp32 rstd) and RMSNorm's normalized ``x`` (fp32 for an fp32 input; for a 16-bit one on
    the CPU the fp32 copy of the input, kept instead of the input, and ``x * rstd`` in the input's dtype),
    as :func:`norm_bytes` counts the layers' norms. (0, False) without ``qk_layernorm``."""
    c = spec.config
    if not c.qk_layernorm:
        return 0, False
    t, B = layout.tp, spec.bytes_per_param
    rows = spec.seq_length * layout.micro_batch_size * (c.num_attention_heads + spec.num_query_groups) // t
    elements = rows * spec.kv_channels
    rms = c.normalization == "RMSNorm"
    if not on_cpu:
        return (1 if rms else 2) * rows * 4 + (elements * B if rms else 0), True
    if not rms:
        return 2 * rows * B, True
    if B == 4:
        return rows * 4 + elements * 4, True
    return rows * 4 + elements * (4 + B), False


def _attention_bytes(spec: ModelSpec, layout: Layout, on_cpu: bool) -> int:
    """Saved tensors of the QKV split, the q/k norms, RoPE and core attention. q, k and v are views of the
    fused QKV output unless the q/k norms or RoPE (new q and k), the split (a new q: under grouped-query
    attention with more than one group on the rank, ``[s, b, groups, heads/groups * d]`` reshaped to heads
    is a copy) or grouped-query expansion (new k and v) replaced them; the fused output is kept while any
    view of it is saved, by attention or by a q/k norm that keeps its input."""
    c = spec.config
    s, b, t, B = spec.seq_length, layout.micro_batch_size, layout.tp, spec.bytes_per_param
    heads = c.num_attention_heads // t
    mixed = s * b * (c.query_projection_size + 2 * c.kv_projection_size) // t * B
    qsz, kvsz = s * b * c.query_projection_size // t * B, s * b * c.kv_projection_size // t * B
    new_qk = c.position_embedding_type == "rope" or c.qk_layernorm
    gqa = spec.num_query_groups != c.num_attention_heads
    q_copy = gqa and spec.num_query_groups // t > 1
    qk_norms, norm_inputs = _qk_norm_bytes(spec, layout, on_cpu)
    qk_norms += qsz if q_copy and norm_inputs else 0  # the split's copy of q, the q norm's input
    new = (qsz if new_qk or q_copy else 0) + (kvsz if new_qk else 0)
    if layout.recompute == "selective":  # the checkpoint keeps q, k, v and the context
        return mixed + new + qsz + qk_norms
    if _uses_sdpa(spec, on_cpu):  # q, k, v, output and log-sum-exp (a mask's additive form: per chunk)
        return mixed + new + qsz + b * heads * s * 4 + qk_norms
    # q, k and v as the two products keep them: under grouped-query attention a new q (the split's copy, or
    # else the [b * heads, s, d] reshape of its view copies) and the expanded k and v; otherwise views of
    # the fused output, q and k new after their norms or RoPE.
    total = (qsz if new_qk or gqa else 0) + (qsz if gqa else kvsz if new_qk else 0) + (qsz if gqa else 0)
    if not gqa or norm_inputs:
        total += mixed
    total += qk_norms
    # The causal path without a fused softmax kernel (the CPU's case; on a GPU under the "fused"
    # backend a kernel is expected) keeps only the score blocks on and below the diagonal.
    blocked = not spec.document_mask and (on_cpu or c.attention_backend != "fused")
    scores = heads * b * (sum((end - start) * end for start, end in causal_blocks(s)) if blocked else s * s)
    fp32_probs = c.attention_softmax_in_fp32 and B < 4
    total += scores * (4 if fp32_probs else B) + qsz  # softmax output, context copy
    if c.attention_dropout > 0 and not blocked:
        total += scores  # bool mask (the blocked path's backward needs none)
    if c.attention_dropout > 0 or fp32_probs:
        total += scores * B  # the probabilities (dropped, or cast from fp32) in the dtype of the product with v
    return total


def head_activation_bytes(spec: ModelSpec, layout: Layout, on_cpu: bool = True) -> int:
    """Bytes the last stage's final norm, output layer and loss keep for backward per microbatch, on one rank.

    Every term a saved tensor (tests/test_autotune_activations.py counts them with ``saved_tensors_hooks``),
    ``r`` = sbh, divided by TP under sequence parallelism:

    - final norm: what :func:`norm_bytes` counts (its input, ``4r`` with ``--fp32-residual-connection``, or
      RMSNorm's fp32 copy of it on the CPU; the statistics, RMSNorm's normalized ``x``, fp32 weight copies)
      and its output (``rB``: the output layer keeps its input, as every column-parallel linear: under SP
      only the local shard, re-gathered in backward as Megatron-LM);
    - loss (``tensor_parallel.cross_entropy``): the fp32 softmax of the logits shard (``4 s b V / t``),
      the target index (int64) and the ignore mask (bool) per token; under TP > 1 also the shard's share
      of the normaliser (fp32) and the out-of-shard mask (bool) per token.
    """
    c = spec.config
    s, b, h, t = spec.seq_length, layout.micro_batch_size, c.hidden_size, layout.tp
    shard = t if layout.sequence_parallel else 1
    r, B = s * b * h // shard, spec.bytes_per_param
    # the norm's input is the residual stream (fp32 with --fp32-residual-connection), its output the params dtype
    norm = norm_bytes(spec, layout, on_cpu) + r * B
    vocab = spec.padded_vocab(t) // t
    loss = 4 * s * b * vocab + (8 + 1) * s * b + ((4 + 1) * s * b if t > 1 else 0)
    return norm + loss


def embedding_activation_bytes(spec: ModelSpec, layout: Layout) -> int:
    """The first stage's embedding dropout mask and token ids."""
    s, b, h = spec.seq_length, layout.micro_batch_size, spec.config.hidden_size
    shard = layout.tp if layout.sequence_parallel else 1
    return (s * b * h // shard if spec.config.hidden_dropout > 0 else 0) + 8 * s * b


def document_mask_bytes(spec: ModelSpec, layout: Layout, on_cpu: bool = True, layers: int | None = None) -> int:
    """Bytes of the document mask [b, 1, s, s] of one micro batch on one model chunk (``--reset-attention-mask``)
    kept for backward: its bool form (``b s^2``) when the explicit path's masked softmax or a recompute
    checkpoint (selective or full) keeps it; under SDPA the additive form in the activations' dtype
    (``b s^2 B``), made once and kept by every layer's SDPA outside a checkpoint: all of them without
    recompute, under full recompute with ``--recompute-method block`` the chunk's layers past the first
    ``recompute_num_layers`` when ``layers`` (the chunk's) exceeds it. 0 without a document mask."""
    if not spec.document_mask:
        return 0
    elements = layout.micro_batch_size * spec.seq_length ** 2
    if not _uses_sdpa(spec, on_cpu):
        return elements
    if layout.recompute is None:
        return elements * spec.bytes_per_param
    unchecked = layout.recompute == "full" and layout.recompute_method == "block" and \
        layers is not None and layers > layout.recompute_num_layers
    return elements + (elements * spec.bytes_per_param if unchecked else 0)


def in_flight(layout: Layout, num_microbatches: int, pp_rank: int) -> int:
    """Chunk forwards whose activations rank ``pp_rank`` holds at once (the schedules' warm-up + 1)."""
    p, m = layout.pp, num_microbatches
    if layout.vpp is None:
        return min(p - pp_rank, m)
    total = m * layout.vpp
    if m == p:
        return total
    return min(total, 2 * (p - pp_rank - 1) + (layout.vpp - 1) * p + 1)


def chunk_activation_bytes(spec: ModelSpec, layout: Layout, layers: int, on_cpu: bool = True) -> tuple[int, int]:
    """(bytes one forward of a model chunk of ``layers`` transformer layers keeps for backward, bytes its
    backward rebuilds at once under full recompute), per microbatch on one rank, the document mask's forward
    forms aside (:func:`document_mask_bytes`).

    Full recompute (``TransformerBlock``, as Megatron-core's): ``uniform`` keeps the input of each group of
    ``recompute_num_layers`` layers and rebuilds a whole group's activations in its backward; ``block``
    keeps the input of each of the chunk's first ``recompute_num_layers`` layers (rebuilt one at a time)
    and all activations of the others. The rebuilt group's first layer counts its input again, as the
    recomputation saves it once more for backward (the same storage as the checkpoint's); under SDPA a
    replay makes a document mask's additive form again (``b s^2 B``, shared by the group's layers)."""
    per_layer = layer_activation_bytes(spec, layout, on_cpu)
    if layout.recompute != "full" or layers == 0:
        return layers * per_layer, 0
    full = layer_activation_bytes(spec, dataclasses.replace(layout, recompute=None), on_cpu)
    if spec.document_mask and _uses_sdpa(spec, on_cpu):
        replayed_mask = layout.micro_batch_size * spec.seq_length ** 2 * spec.bytes_per_param
    else:
        replayed_mask = 0
    k = layout.recompute_num_layers
    if layout.recompute_method == "block":
        checkpointed = min(k, layers)
        return checkpointed * per_layer + (layers - checkpointed) * full, full + replayed_mask if checkpointed else 0
    return -(-layers // k) * per_layer, min(k, layers) * full + replayed_mask


def stage_activation_bytes(spec: ModelSpec, layout: Layout, pp_rank: int, on_cpu: bool = True) -> int:
    """Peak activation bytes on pipeline rank ``pp_rank``: in-flight chunks' saved tensors, plus the
    transient of one backward (the recomputed layers under full recompute, the logits' gradient on the
    last stage)."""
    counts = spec.config.layer_counts(layout.pp, layout.vpp)
    chunks = layout.vpp or 1
    mine = [counts[v * layout.pp + pp_rank] for v in range(chunks)]
    flight = in_flight(layout, spec.num_microbatches(layout), pp_rank)
    kept, rebuilt = chunk_activation_bytes(spec, layout, max(mine), on_cpu)
    # Interleaved ranks cycle through their chunks; the in-flight count is in chunk forwards.
    total = flight * (kept + document_mask_bytes(spec, layout, on_cpu, max(mine)))
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    vocab = spec.padded_vocab(layout.tp) // layout.tp
    s, b = spec.seq_length, layout.micro_batch_size
    if first:
        total += min(flight, spec.num_microbatches(layout)) * embedding_activation_bytes(spec, layout)
    transient = 0
    if last:
        total += min(flight, spec.num_microbatches(layout)) * head_activation_bytes(spec, layout, on_cpu)
        transient = 2 * 4 * s * b * vocab  # logits and their gradient
    return total + max(transient, rebuilt)
