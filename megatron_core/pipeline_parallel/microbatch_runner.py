"""What every schedule does for one microbatch: forward with the loss, backward, grad-sync hooks.

The schedules only decide the order of these steps and the communication between them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_core.parallel_state import ParallelState
from megatron_core.pipeline_parallel.p2p_communication import P2PCommunicator, pipeline_tensor_shape

ForwardStepFunc = Callable[[Any, torch.nn.Module], tuple[Any, Callable]]


def deallocate_output_tensor(output: torch.Tensor | None) -> None:
    """Free a sent stage output's storage, keeping its autograd node (Megatron's trick).

    The next stage holds its own copy; here only ``output.grad_fn`` is still needed, for the
    backward pass, which :func:`custom_backward` runs without looking at the data. A view shares
    its base's storage, so freeing it would save nothing: it is left alone.
    """
    if output is None or not isinstance(output, torch.Tensor) or output._base is not None:
        return
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype)


def custom_backward(output: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``torch.autograd.backward(output, grad_output)`` for an output whose data was freed.

    ``torch.autograd.backward`` checks that the gradient's shape matches the (now 1-element)
    output, so call the autograd engine directly.
    """
    torch.autograd.graph._engine_run_backward(
        (output,), (grad_output,), keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True)


def _unwrap_attr(module: torch.nn.Module, name: str):
    """``module.name``, looking through wrappers (DDP, mixed precision) that keep ``.module``."""
    while not hasattr(module, name):
        inner = getattr(module, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        module = inner
    return getattr(module, name, None)


def communicator_for(parallel_state: ParallelState, model: Sequence[torch.nn.Module], seq_length: int,
                     micro_batch_size: int, hidden_size: int | None, sequence_parallel: bool | None,
                     pipeline_dtype: torch.dtype | None) -> P2PCommunicator:
    """The stage-to-stage communicator; sizes not given are read from the model's ``config``."""
    config = _unwrap_attr(model[0], "config")
    if hidden_size is None:
        hidden_size = getattr(config, "hidden_size", None)
        if hidden_size is None:
            raise ValueError("the pipeline schedule needs the hidden size for its receive buffers: pass "
                             "hidden_size= or give the model chunks a .config with hidden_size")
    if sequence_parallel is None:
        sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    if pipeline_dtype is None:
        pipeline_dtype = (getattr(config, "pipeline_communication_dtype", None)  # a TransformerConfig's
                          or getattr(config, "pipeline_dtype", None) or getattr(config, "params_dtype", None)
                          or torch.float32)
    shape = pipeline_tensor_shape(seq_length, micro_batch_size, hidden_size,
                                  sequence_parallel=sequence_parallel, tp_size=parallel_state.tp_size)
    return P2PCommunicator(parallel_state, shape, pipeline_dtype)


class MicrobatchRunner:
    """Runs forward and backward steps of single microbatches and drives the gradient hooks."""

    def __init__(self, *, parallel_state: ParallelState, forward_step_func: ForwardStepFunc,
                 model: Sequence[torch.nn.Module], num_microbatches: int, forward_only: bool,
                 no_sync_func: Callable | None,
                 finalize_model_grads_func: Callable | None, grad_scale_func: Callable | None,
                 calculate_per_token_loss: bool) -> None:
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        self.parallel_state, self.forward_step_func, self.model = parallel_state, forward_step_func, list(model)
        self.num_microbatches, self.forward_only = num_microbatches, forward_only
        self.finalize_model_grads_func, self.grad_scale_func = finalize_model_grads_func, grad_scale_func
        self.calculate_per_token_loss = calculate_per_token_loss
        self.losses: list[Any] = []
        self.num_tokens = torch.zeros((), dtype=torch.int64)
        self._no_sync_func = no_sync_func
        self._no_sync: contextlib.AbstractContextManager | None = None

    # ---- stage position -----------------------------------------------------------------------
    def is_first(self, chunk_id: int) -> bool:
        """Whether ``chunk_id`` on this rank is the model's first chunk (it reads data, receives nothing)."""
        return self.parallel_state.pp_rank == 0 and chunk_id == 0

    def is_last(self, chunk_id: int) -> bool:
        """Whether ``chunk_id`` on this rank is the model's last chunk (it computes the loss)."""
        return self.parallel_state.pp_rank == self.parallel_state.pp_size - 1 and chunk_id == len(self.model) - 1

    # ---- steps --------------------------------------------------------------------------------
    def forward(self, chunk_id: int, data_iterator: Any, input_tensor: torch.Tensor | None) -> torch.Tensor:
        """One microbatch through one model chunk; on the last stage, the (scaled) loss."""
        chunk = self.model[chunk_id]
        if input_tensor is not None:
            if torch.is_grad_enabled():
                input_tensor.requires_grad_()
            set_input_tensor = _unwrap_attr(chunk, "set_input_tensor")
            if set_input_tensor is None:
                raise TypeError(f"model chunk {chunk_id} ({type(chunk).__name__}) has no set_input_tensor(tensor), "
                                f"which a non-first pipeline stage needs to receive its input")
            set_input_tensor(input_tensor)
        output, loss_func = self.forward_step_func(data_iterator, chunk)
        if not self.is_last(chunk_id):
            return output
        return self._loss(loss_func(output))

    def _loss(self, result: tuple) -> torch.Tensor:
        if len(result) == 3:
            loss, num_tokens, reduced = result
            self.num_tokens += torch.as_tensor(num_tokens).detach().to(torch.int64).cpu()
            if not self.calculate_per_token_loss:
                # A microbatch whose every label is masked has loss_sum 0: it contributes zero loss and
                # zero gradient, never 0 / 0 = nan.
                loss = loss / torch.as_tensor(num_tokens).clamp(min=1)
        elif len(result) == 2:
            if self.calculate_per_token_loss:
                raise ValueError("calculate_per_token_loss=True needs loss_func to return "
                                 "(loss_sum, num_tokens, {name: value})")
            loss, reduced = result
        else:
            raise ValueError(f"loss_func must return (loss, dict) or (loss_sum, num_tokens, dict), "
                             f"got a {len(result)}-tuple")
        self.losses.append(reduced)
        # Per-token losses are summed here and divided by the total token count in finalize.
        return loss if self.calculate_per_token_loss else loss / self.num_microbatches

    def backward(self, input_tensor: torch.Tensor | None, output: torch.Tensor,
                 output_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backward through one chunk; returns the gradient for the previous stage (or None)."""
        if output_grad is None:  # the last stage: ``output`` is the loss
            if self.grad_scale_func is not None:
                output = self.grad_scale_func(output)
            torch.autograd.backward(output)
        elif output.requires_grad:  # not when every parameter before it is frozen: nothing to send back
            custom_backward(output, output_grad)
        return None if input_tensor is None else input_tensor.grad

    # ---- gradient-sync hooks ------------------------------------------------------------------
    def disable_grad_sync(self) -> None:
        """Enter ``no_sync_func()`` so backwards only accumulate (no-op when training without it or already in)."""
        if self._no_sync_func is not None and self._no_sync is None and not self.forward_only:
            self._no_sync = self._no_sync_func()
            self._no_sync.__enter__()

    def enable_grad_sync(self) -> None:
        """Leave the ``no_sync_func()`` context so the next backward syncs DP gradients."""
        if self._no_sync is not None:
            self._no_sync.__exit__(None, None, None)
            self._no_sync = None

    def finish(self) -> list[Any]:
        """Re-enable grad sync, call finalize once after the last backward, return the loss dicts."""
        self.enable_grad_sync()
        if not self.forward_only and self.finalize_model_grads_func is not None:
            if self.calculate_per_token_loss:
                self.finalize_model_grads_func(self.model, num_tokens=self.num_tokens)
            else:
                self.finalize_model_grads_func(self.model)
        return self.losses


def grad_mode(forward_only: bool) -> contextlib.AbstractContextManager:
    """No autograd graph in forward-only (evaluation) mode."""
    return torch.no_grad() if forward_only else contextlib.nullcontext()


def as_list(model: Any) -> list[torch.nn.Module]:
    """``model`` as a list of chunks (a single module becomes a one-element list)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]
