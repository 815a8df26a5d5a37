"""Cross entropy over logits split along the vocabulary, without gathering them.

Matches ``torch.nn.functional.cross_entropy(..., reduction="none")`` on the gathered logits,
including label smoothing and ignored positions (which get loss 0 and no gradient).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_core import shm_collectives
from megatron_core.tensor_parallel.mappings import _rank, _size


def reduce_over(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``x`` in place over ``group`` (a no-op for one rank); returns ``x``."""
    if _size(group) > 1:
        shm_collectives.all_reduce(x, group, op=op)
    return x


_all_reduce = reduce_over


def check_labels(target: torch.Tensor, ignored: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError naming a label outside [0, vocab_size) among the positions not ignored."""
    if not ignored.all():
        valid = target[~ignored]
        if int(valid.min()) < 0 or int(valid.max()) >= vocab_size:
            raise ValueError(f"label {int(valid.max()) if int(valid.max()) >= vocab_size else int(valid.min())} "
                             f"is outside the vocabulary [0, {vocab_size})")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy from each rank's softmax over its vocabulary shard.

    Each rank takes torch's fused softmax of its shard (``sm_r``); its normaliser
    ``S_r = sum exp(x - max_r)`` is ``1 / max(sm_r)`` (the largest probability is at least
    1 / partition, so this is exact to fp32 rounding). With ``M`` the global max (one MAX all-reduce)
    and ``w_r = S_r exp(max_r - M)``, ``Z = sum_r w_r`` (one SUM all-reduce of [tokens] values; the
    target logit, less M, rides along), the loss is ``log Z - (x[target] - M)`` and ``sm_r * w_r / Z`` is the
    global softmax, so backward is one in-place pass (softmax - one-hot, times the incoming
    gradient), as Megatron-LM's.
    This is 3-4x faster on CPU than max/exp/sum/divide passes (``Tensor.max(dim)`` with indices alone
    cost 13x ``amax``), and faster than ``F.cross_entropy`` on one rank (measured [2048, 2048] fp32,
    one thread: 3.9 ms vs 11.9 ms before and 6.8 ms for torch, forward and backward).
    """

    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing, ignore_index):
        logits = logits.float()
        partition = logits.shape[-1]
        world = _size(group)
        start = _rank(group) * partition
        vocab_size = partition * world
        ignored = target == ignore_index
        check_labels(target, ignored, vocab_size)
        outside = (target < start) | (target >= start + partition)
        local_target = (target - start).masked_fill(outside, 0)

        softmax = torch.softmax(logits, dim=-1)
        local_max = logits.amax(dim=-1)
        global_max = _all_reduce(local_max.clone(), group, dist.ReduceOp.MAX)
        # sum_v exp(x_v - local_max) is 1 / the shard's largest probability; weighted to the global max.
        weight = softmax.amax(dim=-1).reciprocal_().mul_((local_max - global_max).exp_())
        # The target's logit relative to the global max, on the rank that holds it: the loss
        # log Z - (x_t - M) keeps fp32's relative precision where (M + log Z) - x_t loses ulp(M).
        predicted = (torch.gather(logits, -1, local_target.unsqueeze(-1)).squeeze(-1) - global_max).masked_fill(
            outside, 0.0)
        parts = [weight, predicted]
        if label_smoothing > 0:
            # sum_v (x_v - M) over the shard, accumulated in fp64 so that subtracting partition * M
            # leaves the small difference exact, without a [tokens, partition] temporary.
            parts.append((logits.sum(dim=-1, dtype=torch.float64) - partition * global_max.double()).float())
        sums = _all_reduce(torch.stack(parts), group)
        log_z = sums[0].log()
        loss = log_z - sums[1]
        if label_smoothing > 0:
            # torch's definition: (1 - e) * nll + e * mean over classes of -log p, where
            # -log p_v = log Z - (x_v - M): both terms relative to M, as the nll (summing raw logits
            # and subtracting lse = M + log Z would lose ulp(M) absolute, 6e-5 at logits near 1000).
            smooth = log_z - sums[2] / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
        loss = loss.masked_fill(ignored, 0.0)
        # The shard's share of the global normaliser, a ratio of sums (exp(lse_r - lse) would lose
        # ~1e-6 relative: lse is ~log(V) in magnitude); exactly 1 on one rank.
        ctx.save_for_backward(softmax, weight / sums[0], outside, local_target, ignored)
        ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab_size
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, shard_scale, outside, local_target, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        scale = grad_output.masked_fill(ignored, 0.0)
        grad = softmax.mul_((shard_scale * scale).unsqueeze(-1))  # the global softmax times the gradient
        hit = scale.masked_fill(outside, 0.0).mul_(1.0 - eps)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), hit.neg().unsqueeze(-1))
        if eps > 0:
            grad.sub_((scale * (eps / ctx.vocab_size)).unsqueeze(-1))
        return grad, None, None, None, None


class _CrossEntropy(torch.autograd.Function):
    """Cross entropy of whole-vocabulary logits (one rank, no label smoothing).

    Forward is torch's log-softmax; its exp, taken in place, is kept for backward, which is one
    in-place pass (softmax times the incoming gradient) and a scatter of the target's -1: the
    formula of torch's log-softmax backward without the zero-filled [tokens, V] gradient that NLL's
    backward feeds it. Losses are bitwise ``F.cross_entropy``'s; gradients differ from it by torch's
    two exp implementations (within 2 ulps of softmax x gradient). Measured fp32, 2 threads, forward
    and backward, against ``F.cross_entropy`` (the earlier TP 1 path): [1024, 50304] 55 ms vs 90 ms,
    [2048, 4096] level (8.6 vs 8.3 ms).
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        ignored = target == ignore_index
        check_labels(target, ignored, log_probs.shape[-1])
        index = target.masked_fill(ignored, 0).unsqueeze(-1)
        loss = torch.gather(log_probs, -1, index).squeeze(-1).neg_().masked_fill_(ignored, 0.0)
        ctx.save_for_backward(log_probs.exp_(), index, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        probs, index, ignored = ctx.saved_tensors
        scale = grad_output.masked_fill(ignored, 0.0)
        grad = probs.mul_(scale.unsqueeze(-1))
        grad.scatter_add_(-1, index, scale.neg().unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, group=None,
                                 label_smoothing: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss from logits split along the last (vocabulary) dimension over ``group``.

    Computed in fp32. ``target`` has the logits' shape without the last dimension.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if _size(group) == 1 and label_smoothing == 0.0:
        return _CrossEntropy.apply(vocab_parallel_logits, target, ignore_index)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group, label_smoothing, ignore_index)
