"""Column- and row-parallel linear layers and the vocab-parallel embedding.

Shapes follow Megatron-LM: activations are [sequence, batch, hidden]; a ColumnParallelLinear
splits its output features across TP ranks, a RowParallelLinear its input features. Both return
``(output, bias)`` so the caller can fuse the bias add into what follows (``skip_bias_add``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from typing_extensions import override

from megatron_core import device as device_mod
from megatron_core import shm_collectives
from megatron_core.fusions.onednn_linear import input_grad, linear
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.tensor_parallel.mappings import (
    gather_first_async,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_first_async,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_core.tensor_parallel.utils import (
    InitMethod,
    divide,
    init_method_normal,
    set_sequence_parallel_attribute,
    set_tensor_model_parallel_attributes,
    sharded_parameter,
)


def _zeros(n: int, dtype: torch.dtype, dev: torch.device) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(n, dtype=dtype, device=dev))


class LinearWithGradAccumulationAndAsyncCommunication(torch.autograd.Function):
    """ColumnParallelLinear's ``F.linear`` with its input-side TP communication overlapped in backward.

    Sequence parallel (``sequence_parallel=True``): x [s / TP, b, h_in] is all-gathered to
    [s, b, h_in] and multiplied by weight [h_out / TP, h_in] (+ bias) to [s, b, h_out / TP]; only
    x, not the gathered input, is kept for backward, which saves (TP - 1) / TP of this input's
    activation bytes (Korthikanti et al., 2022, section 4.2.2). Backward starts the all-gather of
    x again, computes grad_input = grad_output @ weight while it runs, waits, then starts the
    reduce-scatter of grad_input and computes the weight and bias gradients while it runs.

    Otherwise x [s, b, h_in] is replicated over TP; backward starts the all-reduce of grad_input
    and computes the weight and bias gradients while it runs (Megatron-LM's
    ``async_tensor_model_parallel_allreduce``), instead of an identity whose backward all-reduces.
    Follows Megatron-LM's function of this name. The overlap is used where the backend runs
    collectives off the CPU (NCCL); with gloo each collective is waited for as soon as it starts.
    Under autocast the backward runs in the forward's autocast state (as ``torch.amp.custom_bwd``,
    which Megatron-LM uses, does for one device type; here for the input's), so the products meet
    the low-precision grad_output with a weight cast the same way.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel):
        """x [s(/TP), b, h_in], weight [h_out / TP, h_in], bias [h_out / TP] or None -> [s, b, h_out / TP]."""
        total_input = x
        if sequence_parallel:
            total_input, work = gather_first_async(x, group)
            if work is not None:
                work.wait()
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.use_bias, ctx.sequence_parallel = group, bias is not None, sequence_parallel
        kind = x.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        # gloo runs collectives on CPU threads that compete with the matmuls for the same cores: on
        # a 2-core machine overlapping made a step ~3x slower (measured), so wait at once there.
        ctx.overlap = dist.get_backend(group) != "gloo"
        return linear(total_input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        """Grads of x, weight and bias; the input-side collective overlaps the matmuls."""
        kind, enabled, dtype = ctx.autocast
        if not enabled:  # the usual case: no context manager per layer and step
            return LinearWithGradAccumulationAndAsyncCommunication._backward(ctx, grad_output)
        with torch.autocast(kind, dtype=dtype):
            return LinearWithGradAccumulationAndAsyncCommunication._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total_input, gather_work = x, None
        if need_weight and ctx.sequence_parallel:
            total_input, gather_work = gather_first_async(x, ctx.group)
        grad_output = grad_output.contiguous()
        if gather_work is not None and not ctx.overlap:
            gather_work.wait()
            gather_work = None
        full_grad_input = input_grad(grad_output, weight) if need_input else None
        if gather_work is not None:
            gather_work.wait()
        grad_input = work = None
        if full_grad_input is not None:
            if ctx.sequence_parallel:
                grad_input, work = reduce_scatter_first_async(full_grad_input, ctx.group)
            else:
                grad_input = full_grad_input
                work = shm_collectives.all_reduce(full_grad_input, ctx.group, async_op=True)
            if work is not None and not ctx.overlap:
                work.wait()
                work = None
        grad_weight = grad_bias = None
        g2 = grad_output.view(-1, grad_output.shape[-1])
        if need_weight:
            grad_weight = g2.t().mm(total_input.reshape(-1, total_input.shape[-1]))
        if ctx.use_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(dim=0)
        if work is not None:
            work.wait()
        return grad_input, grad_weight, grad_bias, None, None


class ColumnParallelLinear(torch.nn.Module):
    """Y = XA + b with A split by columns (output features) across tensor-parallel ranks."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, gather_output: bool = False,
                 init_method: InitMethod | None = None, stride: int = 1, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 parallel_state: ParallelState | None = None) -> None:
        super().__init__()
        ps = get_parallel_state(parallel_state)
        self.tp_group, tp, rank = ps.tp_group, ps.tp_size, ps.tp_rank
        if sequence_parallel and gather_output:
            raise ValueError("gather_output=True cannot be combined with sequence_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, tp, "ColumnParallelLinear output_size")
        self._tp = tp
        self.gather_output, self.skip_bias_add, self.sequence_parallel = gather_output, skip_bias_add, sequence_parallel
        dev = device_mod.current_device()
        self.weight = sharded_parameter((output_size, input_size), 0, init_method or init_method_normal(0.02),
                                        stride=stride, rank=rank, world=tp, dtype=params_dtype, device=dev)
        if bias:
            self.bias = _zeros(self.output_size_per_partition, params_dtype, dev)
            set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None):
        """x [s, b, h_in] ([s / TP, b, h_in] under sequence parallelism) -> (output, bias or None).

        The output is [s, b, h_out / TP], or [s, b, h_out] with ``gather_output``; the bias comes back
        unadded with ``skip_bias_add``. ``weight`` [h_out / TP, h_in] replaces this layer's own (the
        output layer tied to the word embedding passes the embedding table)."""
        weight = self.weight if weight is None else weight
        bias = None if self.skip_bias_add else self.bias
        if self._tp > 1:
            out = LinearWithGradAccumulationAndAsyncCommunication.apply(x, weight, bias, self.tp_group,
                                                                        self.sequence_parallel)
        else:
            out = linear(x, weight, bias)
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)

    @override
    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, out_per_partition={self.output_size_per_partition}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(torch.nn.Module):
    """Y = XA + b with A split by rows (input features); partial products are summed across TP."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, input_is_parallel: bool = True,
                 init_method: InitMethod | None = None, stride: int = 1, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 parallel_state: ParallelState | None = None) -> None:
        super().__init__()
        ps = get_parallel_state(parallel_state)
        self.tp_group, tp, rank = ps.tp_group, ps.tp_size, ps.tp_rank
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel=True needs input_is_parallel=True in RowParallelLinear")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, tp, "RowParallelLinear input_size")
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel, self._tp = sequence_parallel, tp
        dev = device_mod.current_device()
        self.weight = sharded_parameter((output_size, input_size), 1, init_method or init_method_normal(0.02),
                                        stride=stride, rank=rank, world=tp, dtype=params_dtype, device=dev)
        if bias:
            self.bias = _zeros(output_size, params_dtype, dev)
            # Under sequence parallelism each rank adds the bias to its own tokens only, so the
            # bias gradient is partial and must be all-reduced over TP like a norm's weight.
            set_sequence_parallel_attribute(self.bias, sequence_parallel)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor):
        """x [s, b, h_in / TP] (or [s, b, h_in] without ``input_is_parallel``) -> (output, bias or None).

        The output is [s, b, h_out] summed over TP, or [s / TP, b, h_out] reduce-scattered along the
        sequence under sequence parallelism; the bias comes back unadded with ``skip_bias_add``."""
        if self._tp == 1 and not self.skip_bias_add:
            # Nothing to sum over ranks, so the bias rides in the product (oneDNN adds it in the
            # product's output pass; a separate add is one more pass over [s, b, h]).
            return linear(x, self.weight, self.bias), None
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group)
        out = linear(x, self.weight)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, self.tp_group)
        if self.skip_bias_add or self.bias is None:
            return out, self.bias
        return out + self.bias, None

    @override
    def extra_repr(self) -> str:
        return (f"in={self.input_size}, in_per_partition={self.input_size_per_partition}, out={self.output_size}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table split along the vocabulary; each rank looks up the ids in its range.

    ``num_embeddings`` is the padded vocabulary (see ``pad_vocab_size``). Input ids are
    [batch, sequence]; the output is [batch, sequence, hidden], or, with
    ``reduce_scatter_embeddings``, [sequence / TP, batch, hidden] for sequence parallelism.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: InitMethod | None = None,
                 reduce_scatter_embeddings: bool = False, params_dtype: torch.dtype = torch.float32,
                 check_ids: bool = True, parallel_state: ParallelState | None = None) -> None:
        super().__init__()
        ps = get_parallel_state(parallel_state)
        self.tp_group, tp, rank = ps.tp_group, ps.tp_size, ps.tp_rank
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = divide(num_embeddings, tp, "vocabulary size (pad it with --make-vocab-size-divisible-by)")
        self.vocab_start_index, self.vocab_end_index = rank * per_rank, (rank + 1) * per_rank
        self.reduce_scatter_embeddings, self.check_ids = reduce_scatter_embeddings, check_ids
        self.weight = sharded_parameter((num_embeddings, embedding_dim), 0, init_method or init_method_normal(0.02),
                                        stride=1, rank=rank, world=tp, dtype=params_dtype,
                                        device=device_mod.current_device())
        self._tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [b, s] -> embeddings [b, s, h], or [s / TP, b, h] with ``reduce_scatter_embeddings``.

        Raises ValueError naming the id when an id is outside [0, num_embeddings) (with ``check_ids``)."""
        if self.check_ids and input_ids.numel() > 0:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.num_embeddings:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.num_embeddings}); check that "
                                 f"the tokenizer matches the model's --vocab-size / padded vocabulary")
        if self._tp > 1:
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(input_ids, self.weight)
        if self.reduce_scatter_embeddings:
            out = out.transpose(0, 1).contiguous()
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        return reduce_from_tensor_model_parallel_region(out, self.tp_group)
