"""Cross entropy over logits split along the vocabulary, without gathering them.

Matches ``torch.nn.functional.cross_entropy(..., reduction="none")`` on the gathered logits,
including label smoothing and ignored positions (which get loss 0 and no gradient).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_core.tensor_parallel.mappings import _rank, _size


def reduce_over(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``x`` in place over ``group`` (a no-op for one rank); returns ``x``."""
    if _size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
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
    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing, ignore_index):
        logits = logits.float()
        logits_max = _all_reduce(logits.max(dim=-1)[0], group, dist.ReduceOp.MAX)
        logits = logits - logits_max.unsqueeze(-1)

        partition = logits.shape[-1]
        world = _size(group)
        start = _rank(group) * partition
        vocab_size = partition * world
        ignored = target == ignore_index
        check_labels(target, ignored, vocab_size)
        outside = (target < start) | (target >= start + partition)
        local_target = (target - start).masked_fill(outside, 0)

        logits_2d = logits.view(-1, partition)
        flat_target = local_target.reshape(-1)
        rows = torch.arange(logits_2d.shape[0], device=logits.device)
        predicted = logits_2d[rows, flat_target].view_as(target).masked_fill(outside, 0.0)
        predicted = _all_reduce(predicted, group)

        exp_logits = logits.exp()
        sum_exp = _all_reduce(exp_logits.sum(dim=-1), group)
        log_z = sum_exp.log()
        loss = log_z - predicted
        if label_smoothing > 0:
            # torch's definition: (1 - e) * nll + e * mean over classes of -log p.
            sum_logits = _all_reduce(logits.sum(dim=-1), group)
            smooth = log_z - sum_logits / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target, ignored)
        ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab_size
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, outside, local_target, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax
        partition = grad.shape[-1]
        grad_2d = grad.view(-1, partition)
        rows = torch.arange(grad_2d.shape[0], device=grad.device)
        hit = (~outside).reshape(-1).to(grad.dtype)
        grad_2d[rows, local_target.reshape(-1)] -= (1.0 - eps) * hit
        if eps > 0:
            grad_2d -= eps / ctx.vocab_size
        scale = grad_output.masked_fill(ignored, 0.0).unsqueeze(-1)
        grad.mul_(scale)
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, group=None,
                                 label_smoothing: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss from logits split along the last (vocabulary) dimension over ``group``.

    Computed in fp32. ``target`` has the logits' shape without the last dimension.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group, label_smoothing, ignore_index)
