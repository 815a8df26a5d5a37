"""Point-to-point exchange of activations and gradients between adjacent pipeline ranks.

Every exchange is one ``batch_isend_irecv`` call whose operations are all posted before any is
waited on, so paired calls (send forward + receive backward on one rank, send backward + receive
forward on its neighbour) cannot deadlock. Received shapes are known up front:
``[seq_length (/ TP under sequence parallelism), micro_batch_size, hidden_size]``.

Activations travel with one tag and gradients with another. Messages between two ranks are
matched per tag in posting order, so with two pipeline ranks (where "next" and "previous" are the
same peer) an activation can never be taken for a gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_core import device as device_mod
from megatron_core.parallel_state import ParallelState

_ACTIVATION_TAG = 0
_GRADIENT_TAG = 1


def pipeline_tensor_shape(seq_length: int, micro_batch_size: int, hidden_size: int, *,
                          sequence_parallel: bool = False, tp_size: int = 1) -> tuple[int, int, int]:
    """Shape of the tensor passed between stages: ``[s (/ TP with sequence parallelism), b, h]``."""
    if sequence_parallel:
        if seq_length % tp_size != 0:
            raise ValueError(f"--seq-length {seq_length} is not divisible by --tensor-model-parallel-size "
                             f"{tp_size}, which --sequence-parallel needs")
        seq_length //= tp_size
    return (seq_length, micro_batch_size, hidden_size)


class P2PCommunicator:
    """Batched sends and receives between this pipeline rank and its neighbours (a ring)."""

    def __init__(self, parallel_state: ParallelState, tensor_shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        self.parallel_state = parallel_state
        self.tensor_shape = tuple(tensor_shape)
        self.dtype = dtype
        self.device = device if device is not None else device_mod.current_device()

    # ---- the one primitive --------------------------------------------------------------------
    def communicate(self, *, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                    recv_prev: bool = False, recv_next: bool = False
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send to / receive from the next and previous ranks in one batch; returns
        ``(from_prev, from_next)`` (``None`` where nothing was received)."""
        ps = self.parallel_state
        ops = []
        for tensor, peer, tag, what in ((send_prev, ps.prev_pipeline_rank, _GRADIENT_TAG, "gradient"),
                                        (send_next, ps.next_pipeline_rank, _ACTIVATION_TAG, "activation")):
            if tensor is not None:
                ops.append(dist.P2POp(dist.isend, self._checked(tensor, what), peer, ps.pp_group, tag=tag))
        from_prev = self._buffer() if recv_prev else None
        from_next = self._buffer() if recv_next else None
        for buffer, peer, tag in ((from_prev, ps.prev_pipeline_rank, _ACTIVATION_TAG),
                                  (from_next, ps.next_pipeline_rank, _GRADIENT_TAG)):
            if buffer is not None:
                ops.append(dist.P2POp(dist.irecv, buffer, peer, ps.pp_group, tag=tag))
        if ops:
            # Waiting here (not later) lets the caller free a sent tensor's storage right away.
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return from_prev, from_next

    # ---- 1F1B helpers: the first / last rank have no previous / next stage ---------------------
    def recv_forward(self) -> torch.Tensor | None:
        """The previous stage's activation (``tensor_shape``), or None on the first stage."""
        return self.communicate(recv_prev=not self.parallel_state.is_pipeline_first_stage())[0]

    def recv_backward(self) -> torch.Tensor | None:
        """The next stage's gradient for this stage's output, or None on the last stage."""
        return self.communicate(recv_next=not self.parallel_state.is_pipeline_last_stage())[1]

    def send_forward(self, output: torch.Tensor | None) -> None:
        """Send ``output`` to the next stage (nothing on the last stage)."""
        self.communicate(send_next=None if self.parallel_state.is_pipeline_last_stage() else output)

    def send_backward(self, input_grad: torch.Tensor | None) -> None:
        """Send ``input_grad`` to the previous stage (nothing on the first stage)."""
        self.communicate(send_prev=None if self.parallel_state.is_pipeline_first_stage() else input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor | None) -> torch.Tensor | None:
        """Send ``output`` on and receive its gradient from the next stage (None on the last)."""
        last = self.parallel_state.is_pipeline_last_stage()
        return self.communicate(send_next=None if last else output, recv_next=not last)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Send ``input_grad`` back and receive the next activation (None on the first stage)."""
        first = self.parallel_state.is_pipeline_first_stage()
        return self.communicate(send_prev=None if first else input_grad, recv_prev=not first)[0]

    # ---- internals ----------------------------------------------------------------------------
    def _buffer(self) -> torch.Tensor:
        return torch.empty(self.tensor_shape, dtype=self.dtype, device=self.device)

    def _checked(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(tensor.shape) != self.tensor_shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"pipeline {what} to send has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, but the "
                f"pipeline exchanges {self.tensor_shape} {self.dtype} tensors ([seq_length (/TP under sequence "
                f"parallelism), micro_batch_size, hidden_size]); check seq_length, micro_batch_size and the "
                f"model's hidden_size / sequence_parallel / pipeline dtype passed to the schedule")
        return tensor.detach().contiguous()
