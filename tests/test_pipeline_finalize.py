"""finalize_model_grads: DP sync hook, tied-embedding all-reduce on main_grad, per-token scaling."""
import torch
from harness import run_distributed

from megatron_core import parallel_state
from megatron_core.distributed import finalize_model_grads


class _Wrapped(torch.nn.Module):
    """Stands in for a DDP wrapper: grads in ``main_grad``, and a finish_grad_sync to call."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.finished = 0

    def finish_grad_sync(self) -> None:
        self.finished += 1


def _finalize():
    ps = parallel_state.initialize_model_parallel(1, 2)
    inner = torch.nn.Linear(2, 1, bias=False)
    inner.weight.shared_embedding = True
    inner.weight.main_grad = torch.tensor([[1.0, 2.0]]) * (10 ** ps.pp_rank)  # rank 0: 1, 2; rank 1: 10, 20
    other = torch.nn.Linear(1, 1, bias=False)
    other.weight.main_grad = torch.tensor([[6.0]])
    chunk = _Wrapped(torch.nn.Sequential(inner, other))
    # Only the last stage counts tokens; the total (4) must reach every stage.
    finalize_model_grads([chunk], ps, num_tokens=torch.tensor(4 if ps.pp_rank == 1 else 0))
    return chunk.finished, inner.weight.main_grad, other.weight.main_grad, inner.weight.grad


def test_finalize_model_grads():
    for finished, tied, untied, grad in run_distributed(_finalize, 2, timeout=60):
        assert finished == 1
        assert torch.equal(tied, torch.tensor([[11.0, 22.0]]) / 4)
        assert torch.equal(untied, torch.tensor([[6.0]]) / 4)
        assert grad is None
