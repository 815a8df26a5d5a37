"""Triton vocab-parallel cross entropy that keeps only the logits and two numbers per token.

The torch version (``megatron_core.tensor_parallel.cross_entropy``) converts the logits to fp32 and
keeps their softmax for backward: two fp32 [tokens, vocab / TP] tensors. Here three row kernels
read the logits in their own dtype: the local max, then (after the TP all-reduce of the max) the
sum of exp, the sum of logits and the target's logit, and in backward the gradient
softmax - (1 - e) onehot - e / V straight from the logits and the saved per-token max and sum.
Imported only when Triton is installed; tests run it on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megatron_core.tensor_parallel.cross_entropy import check_labels, reduce_over
from megatron_core.tensor_parallel.mappings import _rank, _size


@triton.jit
def _row_max(X, OUT, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        c = start + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, tl.load(X + row * V + c, mask=c < V, other=float("-inf")).to(tl.float32))
    tl.store(OUT + row, tl.max(acc, axis=0))


@triton.jit
def _row_sums(X, MAX, TARGET, SUM_EXP, SUM_X, PRED, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mx = tl.load(MAX + row)
    target = tl.load(TARGET + row)  # local index, -1 when the target is on another rank
    se = tl.zeros([BLOCK], tl.float32)
    sx = tl.zeros([BLOCK], tl.float32)
    pred = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        c = start + tl.arange(0, BLOCK)
        m = c < V
        x = tl.load(X + row * V + c, mask=m, other=0.0).to(tl.float32) - mx
        se += tl.where(m, tl.exp(x), 0.0)
        sx += tl.where(m, x, 0.0)
        pred += tl.where(c == target, x, 0.0)
    tl.store(SUM_EXP + row, tl.sum(se, axis=0))
    tl.store(SUM_X + row, tl.sum(sx, axis=0))
    tl.store(PRED + row, tl.sum(pred, axis=0))


@triton.jit
def _grad(X, MAX, SUM_EXP, TARGET, DY, DX, V, smooth_target, smooth_all, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mx = tl.load(MAX + row)
    inv = 1.0 / tl.load(SUM_EXP + row)
    target = tl.load(TARGET + row)
    dy = tl.load(DY + row)
    for start in range(0, V, BLOCK):
        c = start + tl.arange(0, BLOCK)
        m = c < V
        p = tl.exp(tl.load(X + row * V + c, mask=m, other=0.0).to(tl.float32) - mx) * inv
        g = (p - tl.where(c == target, smooth_target, 0.0) - smooth_all) * dy
        tl.store(DX + row * V + c, g.to(DX.dtype.element_ty), mask=m)


class _TritonVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing, ignore_index, block):
        part = logits.shape[-1]
        x = logits.reshape(-1, part).contiguous()
        rows, vocab_size = x.shape[0], part * _size(group)
        ignored = target == ignore_index
        check_labels(target, ignored, vocab_size)
        start = _rank(group) * part
        flat_target = target.reshape(-1)
        local = flat_target - start
        local = torch.where((local >= 0) & (local < part), local, torch.full_like(local, -1)).to(torch.int32)
        stats = torch.empty(4, rows, dtype=torch.float32, device=x.device)
        _row_max[(rows,)](x, stats[0], part, BLOCK=block)
        mx = reduce_over(stats[0], group, dist.ReduceOp.MAX)
        _row_sums[(rows,)](x, mx, local, stats[1], stats[2], stats[3], part, BLOCK=block)
        sums = reduce_over(stats[1:].contiguous(), group)
        sum_exp, sum_x, pred = sums.unbind(0)
        log_z = sum_exp.log()
        loss = log_z - pred
        if label_smoothing > 0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - sum_x / vocab_size)
        loss = loss.view_as(target).masked_fill(ignored, 0.0)
        ctx.save_for_backward(x, mx, sum_exp, local, ignored)
        ctx.label_smoothing, ctx.vocab_size, ctx.block, ctx.shape = label_smoothing, vocab_size, block, logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        x, mx, sum_exp, local, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        dy = grad_output.masked_fill(ignored, 0.0).reshape(-1).float().contiguous()
        dx = torch.empty_like(x)
        _grad[(x.shape[0],)](x, mx, sum_exp, local, dy, dx, x.shape[1], 1.0 - eps, eps / ctx.vocab_size,
                             BLOCK=ctx.block)
        return dx.view(ctx.shape), None, None, None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, group=None,
                                 label_smoothing: float = 0.0, ignore_index: int = -100,
                                 block: int = 1024) -> torch.Tensor:
    """Per-token loss [...] from logits [..., vocab / TP] split over ``group``; fp32 loss, the
    logits' gradient in their dtype. Same contract as the torch version (label smoothing as
    torch defines it, ``ignore_index`` positions get loss 0 and no gradient)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    block = min(block, triton.next_power_of_2(vocab_parallel_logits.shape[-1]))
    return _TritonVocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group, label_smoothing,
                                                  ignore_index, block)
