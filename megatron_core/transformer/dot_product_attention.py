"""Core attention: softmax(q k^T / sqrt(d) + mask) v for one TP rank's heads.

Two paths, chosen by ``TransformerConfig.attention_backend``: PyTorch's
``scaled_dot_product_attention`` (``flash``; ``auto`` unless training with dropout on the CPU), and
an explicit one that materialises the scores and normalises them with
:class:`~megatron_core.fusions.FusedScaleMaskSoftmax` (``fused``/``unfused``/``local``), the place a
fused softmax kernel plugs in. Attention dropout
acts on activations split over TP, so it draws from the tracker's per-TP-rank stream.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from megatron_core.fusions.fused_dropout import dropout, keep_mask, masked_scale
from megatron_core.fusions.fused_softmax import FusedScaleMaskSoftmax, softmax_dtype
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.transformer.config import TransformerConfig, resolved
from megatron_core.transformer.enums import AttnBackend, AttnMaskType

CAUSAL_BLOCK = 128
"""Query rows per block of the explicit causal path (128 and 256 measured alike at s = 1024)."""


def causal_blocks(seq: int) -> list[tuple[int, int]]:
    """(start, end) query rows of each block of the explicit causal path."""
    return [(start, min(start + CAUSAL_BLOCK, seq)) for start in range(0, seq, CAUSAL_BLOCK)]


class _CausalBlockAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + causal mask) v, with dropout on the probabilities, by blocks of query rows.

    Query block [start, end) attends over keys [0, end): the blocks above the diagonal, whose
    probabilities are exactly 0, are never computed (products, softmax and dropout over (C+1)/2C of
    the s x s scores for C blocks). Scale and causal mask ride in the score product (``baddbmm``);
    ``band`` is :meth:`DotProductAttention._causal_band`.
    Backward computes dq per block and accumulates dk, dv over the key prefixes: autograd over the
    same forward would zero-fill a full-size gradient per key prefix and add them. Its products write
    contiguous tensors (batched GEMMs; see ``backward``): the gradients leave in [b*n, s, d] order,
    not in q's strides (bench_mfu step at 2 threads 375-411 vs 380-421 ms with in-place ``baddbmm_``
    into q-strided slices, alternated in one process, three runs; level at 1 thread). With dropout
    (keep mask m, keep scale c, probabilities P, dropped D = c m P), the
    softmax and dropout backward of dL/dD = G is ``G D - P rowsum(G D)``: ``P (c m G - rowsum(P c m
    G))`` with ``P c m = D`` (the identity FlashAttention's backward uses, Dao et al. 2022, alg. 4), so
    the mask is not kept for backward and its uint8-to-float pass is skipped there (on [32, 256, 64],
    2 threads: 21.2 vs 22.6 ms forward + backward). A row's softmax sums over fewer exact zeros than
    the full s x s one, so values may differ from it in the last bit.

    Measured forward + backward with dropout 0.1 on [32, 256, 64]: full s x s 20.9 ms, blocks with
    autograd 17.6, this 15.5 (2 threads); 1 thread 36.3 / 29.3 / 26.5 ms. [8, 1024, 64], 2 threads:
    143 ms full, 49 ms by blocks (the scores no longer leave the cache).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, band, masks, softmax_dtype):
        saved = []
        bn, s, d = q.shape
        rows = band.shape[0]
        # Blocks are written in [s, b*n, d] order and returned as its [b*n, s, d] view: the caller's
        # [s, b, n*d] context is then that memory as is (a cat, then a permute copy, cost two passes).
        out = q.new_empty(s, bn, d)
        for i, (start, end) in enumerate(causal_blocks(s)):
            # Row j of the block is query start + j: the band's row rows - (end - start) + j, read
            # from column s - end on, is -inf exactly right of that query's key.
            bias = band[rows - (end - start):, s - end:]
            scores = torch.baddbmm(bias, q[:, start:end], k[:, :end].transpose(1, 2), alpha=scale)
            probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype)  # fp32 for fp16/bf16 unless told not
            dropped = probs.to(q.dtype)
            if masks is not None:
                dropped = masked_scale(dropped, *masks[i])
            out[start:end].copy_(torch.bmm(dropped, v[:, :end]).transpose(0, 1))
            saved += [probs, dropped]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.scale, ctx.dropout = scale, masks is not None
        return out.transpose(0, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        q, k, v, *saved = ctx.saved_tensors
        blocks = causal_blocks(q.shape[1])
        dk = dv = None
        dq_blocks = []
        # Last block first: it covers every key, so its products are dk, dv whole; the others add to
        # their key prefixes. Every product writes a fresh contiguous tensor (one batched GEMM): an
        # in-place baddbmm_ into a slice, or into a tensor in q's [s, b, n, d] strides, is not
        # contiguous, and ATen then runs one small GEMM per batch entry (32 addmm_ per product here).
        for i in reversed(range(len(blocks))):
            start, end = blocks[i]
            probs, dropped = saved[2 * i], saved[2 * i + 1]
            grad = grad_output[:, start:end]
            grad_v = torch.bmm(dropped.transpose(1, 2), grad)
            grad_dropped = torch.bmm(grad, v[:, :end].transpose(1, 2)).to(probs.dtype)
            if ctx.dropout:
                grad_scores = grad_dropped.mul_(dropped)
                grad_scores.addcmul_(probs, grad_scores.sum(-1, keepdim=True), value=-1.0)
            else:
                grad_scores = torch._softmax_backward_data(grad_dropped, probs, -1, probs.dtype)
            grad_scores = grad_scores.to(q.dtype)
            dq_blocks.append(torch.bmm(grad_scores, k[:, :end]).mul_(ctx.scale))
            grad_k = torch.bmm(grad_scores.transpose(1, 2), q[:, start:end])
            if dk is None or dv is None:
                dk, dv = grad_k.mul_(ctx.scale), grad_v
            else:
                dk[:, :end].add_(grad_k, alpha=ctx.scale)
                dv[:, :end].add_(grad_v)
        dq = dq_blocks[0] if len(dq_blocks) == 1 else torch.cat(dq_blocks[::-1], dim=1)
        return dq, dk, dv, None, None, None, None


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a bool ``mask`` (True = may NOT attend): -inf there, 0 elsewhere, in ``dtype``.

    What ``scaled_dot_product_attention`` makes of a bool ``attn_mask`` (True = may attend) itself, and
    keeps for backward: given this form it uses and keeps the tensor as is, with the same outputs and
    gradients to the bit (tests/test_document_masks_rank.py)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class SharedAdditiveMask:
    """SDPA's additive form of a bool attention mask, made once per run of a
    :class:`~megatron_core.transformer.transformer_block.TransformerBlock`'s
    layers and shared by their core attentions.

    Each layer used to convert the same [b, 1, s, s] mask itself, and its SDPA kept that copy for backward:
    ``b s^2`` bytes in the activations' dtype per layer, now once per micro batch and chunk (every layer's
    SDPA saves the one tensor). The form is held only inside :meth:`scope` (one run of the layers, in forward
    or in a full-recompute replay); afterwards only the autograd graph keeps it, until its backward.
    Outside a scope (a selective-recompute replay, a core attention used alone) each call converts anew.
    """

    def __init__(self) -> None:
        self._active = False
        self._source: torch.Tensor | None = None
        self._additive: torch.Tensor | None = None

    @contextlib.contextmanager
    def scope(self):
        """Share the conversion among the calls made inside; drop it on exit."""
        self._active = True
        try:
            yield
        finally:
            self._active, self._source, self._additive = False, None, None

    def get(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """:func:`additive_mask` of ``mask``, the one made earlier in this scope for the same tensor and dtype."""
        if self._source is mask and self._additive is not None and self._additive.dtype == dtype:
            return self._additive
        additive = additive_mask(mask, dtype)
        if self._active:
            self._source, self._additive = mask, additive
        return additive


class DotProductAttention(torch.nn.Module):
    """Causal (or explicitly masked) attention of q [s, b, heads, d] over k, v [s, b, groups, d]."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 parallel_state: ParallelState | None = None) -> None:
        super().__init__()
        ps = get_parallel_state(parallel_state)
        self.rng_tracker = ps.rng_tracker
        self.config, self.layer_number = config, layer_number
        self.causal = attn_mask_type == AttnMaskType.causal
        self.scale = 1.0 / math.sqrt(resolved(config.kv_channels, "kv_channels"))
        self.dropout_p = config.attention_dropout
        self.backend = config.attn_backend
        use_kernel = self.backend == AttnBackend.fused and config.masked_softmax_fusion
        kernel_arg = {} if use_kernel else {"kernel": None}
        self.scale_mask_softmax = FusedScaleMaskSoftmax(self.causal, config.attention_softmax_in_fp32, **kernel_arg)
        self._band: torch.Tensor | None = None
        # Set by the TransformerBlock holding this layer, so that its layers convert a mask once.
        self.shared_mask = SharedAdditiveMask()
        self._band_key: tuple[int, int, torch.dtype, torch.device] | None = None

    def _dropout_rng(self):
        if self.training and self.dropout_p > 0:
            return self.rng_tracker.fork()
        return contextlib.nullcontext()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask``: bool, broadcastable to [b, heads, sq, sk], True where attention is NOT
        allowed (Megatron-LM's convention); None means causal. Keys/values may be longer than the
        queries (a KV cache) when a mask is given. Returns [sq, b, heads * d]."""
        s, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d] views
        if self._use_sdpa(q):
            ctx = self._sdpa(q, k, v, attention_mask)
        else:
            ctx = self._explicit(q, k, v, attention_mask)
        return ctx.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    def _use_sdpa(self, q: torch.Tensor) -> bool:
        if not self.backend.uses_sdpa:
            return False
        # SDPA's CPU kernels have no dropout: with dropout on they fall back to a math path that is
        # slower than the explicit one here (cheaper dropout mask, scale and mask folded into baddbmm).
        return not (self.backend == AttnBackend.auto and q.device.type == "cpu" and self.training
                    and self.dropout_p > 0)

    def _sdpa(self, q, k, v, attention_mask):
        p = self.dropout_p if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        mask = None if attention_mask is None else self.shared_mask.get(attention_mask, q.dtype)
        causal = attention_mask is None and self.causal
        with self._dropout_rng():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                  scale=self.scale, enable_gqa=gqa)

    def _explicit(self, q, k, v, attention_mask):
        b, heads, s, d = q.shape
        sk = k.shape[2]
        groups = heads // k.shape[1]
        if groups > 1:
            # Query head i uses key/value head i // groups (heads of one group are adjacent).
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # [b, n] merge into one batch dimension without a copy (the [s, b, n, d] layout allows it).
        q3, k3, v3 = q.reshape(b * heads, s, d), k.reshape(b * heads, sk, d), v.reshape(b * heads, sk, d)
        if attention_mask is None and self.causal and self.scale_mask_softmax.kernel is None and s == sk:
            return self._causal_blocks(q3, k3, v3).view(b, heads, s, d)
        scores = torch.bmm(q3, k3.transpose(1, 2)).view(b, heads, s, sk)
        probs = self.scale_mask_softmax(scores, attention_mask, self.scale).view(b * heads, s, sk)
        if self.training and self.dropout_p > 0:
            with self._dropout_rng():
                probs = dropout(probs, self.dropout_p)
        return torch.bmm(probs, v3).view(b, heads, s, d)

    def _causal_blocks(self, q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor) -> torch.Tensor:
        """Causal attention of q3, k3, v3 [b*heads, s, d] by blocks of query rows
        (:class:`_CausalBlockAttention`); the dropout masks are drawn first, block by block, from
        the tracker's per-TP-rank stream."""
        s = q3.shape[1]
        masks = None
        if self.training and self.dropout_p > 0:
            with self._dropout_rng():
                masks = [keep_mask((q3.shape[0], end - start, end), self.dropout_p, q3.device)
                         for start, end in causal_blocks(s)]
        probs_dtype = softmax_dtype(q3.dtype, self.config.attention_softmax_in_fp32)
        return _CausalBlockAttention.apply(q3, k3, v3, self.scale, self._causal_band(s, q3), masks, probs_dtype)

    def _causal_band(self, s: int, like: torch.Tensor) -> torch.Tensor:
        """[rows, s] additive mask, rows = min(CAUSAL_BLOCK, s): -inf where column > row + s - rows,
        else 0. Every block's causal bias is a slice of it (the mask depends on column - row only),
        so a layer keeps 128 x s values instead of s x s (cached per size/dtype/device)."""
        rows = min(CAUSAL_BLOCK, s)
        key = (s, rows, like.dtype, like.device)
        if self._band is None or self._band_key != key:
            self._band = torch.full((rows, s), float("-inf"), dtype=like.dtype, device=like.device).triu_(s - rows + 1)
            self._band_key = key
        return self._band
