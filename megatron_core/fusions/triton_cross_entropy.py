"""Triton vocab-parallel cross entropy that keeps only the logits and two numbers per token.

The torch version (``megatron_core.tensor_parallel.cross_entropy``) converts the logits to fp32 and
keeps their softmax for backward: two fp32 [tokens, vocab / TP] tensors. Here the forward reads the
logits once, in their own dtype: one row kernel gives the local max, the sums of exp and of logits
relative to it (online softmax) and the target's logit; the sums are moved to the global max after
its TP all-reduce and all-reduced together. Backward writes the gradient
softmax - (1 - e) onehot - e / V straight from the logits and the saved per-token max and sum.
Imported only when Triton is installed; tests run it on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megatron_core.fusions.triton_norms import num_warps
from megatron_core.tensor_parallel.cross_entropy import check_labels, reduce_over
from megatron_core.tensor_parallel.mappings import _rank, _size


@triton.jit
def _row_stats(X, TARGET, MAX, SUM_EXP, SUM_X, PRED, V, BLOCK: tl.constexpr):
    """One pass over a row: its max, sum(exp(x - max)), sum(x - max) and the target's logit.

    Online softmax (Milakov and Gimelshein 2018) kept per lane: each of the BLOCK lanes walks its
    column of the row with its own running max m, sum s of exp(x - m) and count n, and the lanes
    are combined once at the end. The loop has no cross-lane reduction: a per-block max (the earlier
    form) made every program's warps meet at a barrier once per block, 49 times for a 50k row, and
    on an H200 that kernel was latency-bound (bf16 and fp32 logits took the same time, 24% and 54%
    of the copy bandwidth). One exp per element still: with d = x - m, exp(-|d|) is exp(x - m) when
    x <= m and exp(m - x), the old sum's rescale, when x > m (then s becomes s exp(m - x) + 1).
    m starts at fp32's lowest finite value, not -inf, so a lane's first logit gives d finite and
    exp(-d) = 0, not exp(-inf - -inf) = nan; the vocabulary's tail beyond V loads as -inf and adds
    exp(-inf) = 0. The sum of logits is kept relative to the lane's max as well (moved by -n d
    when the max grows), so label smoothing's mean logit keeps fp32's relative precision at logits
    near 1000 (a raw sum would lose ulp(1000) = 6e-5 absolute); its terms are all <= 0.
    """
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row)  # local index, -1 when the target is on another rank
    mx = tl.full([BLOCK], -3.4028234663852886e38, tl.float32)
    se = tl.zeros([BLOCK], tl.float32)
    sx = tl.zeros([BLOCK], tl.float32)
    n = tl.zeros([BLOCK], tl.float32)
    pred = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        c = start + tl.arange(0, BLOCK)
        m = c < V
        x = tl.load(X + row * V + c, mask=m, other=float("-inf")).to(tl.float32)
        d = x - mx
        e = tl.exp(-tl.abs(d))
        grows = d > 0.0
        se = tl.where(grows, se * e + 1.0, se + e)
        sx = tl.where(m, tl.where(grows, sx - n * d, sx + d), sx)
        n += m.to(tl.float32)
        mx = tl.maximum(mx, x)
        pred += tl.where(c == target, x, 0.0)
    row_max = tl.max(mx, axis=0)
    tl.store(MAX + row, row_max)
    tl.store(SUM_EXP + row, tl.sum(se * tl.exp(mx - row_max), axis=0))
    tl.store(SUM_X + row, tl.sum(sx + n * (mx - row_max), axis=0))
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
        _row_stats[(rows,)](x, local, stats[0], stats[1], stats[2], stats[3], part, BLOCK=block,
                            num_warps=num_warps(block))
        local_max = stats[0].clone()
        mx = reduce_over(stats[0], group, dist.ReduceOp.MAX)
        stats[1] *= torch.exp(local_max - mx)  # this rank's sum of exp, now relative to the global max
        # The target's logit relative to the global max, on the rank that holds it (0 elsewhere): the
        # loss log(sum_exp) - (x_t - max) keeps fp32's relative precision where (max + log(sum_exp)) - x_t
        # would lose ulp(max) absolute (2.7e-5 relative, losses near 1 at logits near 1000: the tests).
        stats[3] = torch.where(local >= 0, stats[3] - mx, 0.0)
        stats[2] += part * (local_max - mx)  # sum(x - max) over this shard, now relative to the global max
        sum_exp, sum_x, pred = reduce_over(stats[1:].contiguous(), group).unbind(0)
        log_sum = sum_exp.log()
        loss = log_sum - pred
        if label_smoothing > 0:  # mean over classes of -log p_v = log(sum_exp) - (x_v - max)
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_sum - sum_x / vocab_size)
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
                             BLOCK=ctx.block, num_warps=num_warps(ctx.block))
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
