"""finalize_model_grads: DP sync hook, tied-embedding all-reduce on main_grad, per-token scaling."""
import torch
from harness import run_distributed

from megatron_core import parallel_state
from megatron_core.distributed import finalize_model_grads
from megatron_core.distributed.finalize_model_grads import changed_after_dp_sync


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


def _finalize_tp_pp():
    ps = parallel_state.initialize_model_parallel(2, 2)  # world 4: tp 2 x pp 2
    tag = 1.0 + ps.tp_rank + 10 * ps.pp_rank  # a distinct gradient on every rank
    norm = torch.nn.LayerNorm(2)  # replicated over TP, sees only this rank's sequence shard
    for p in norm.parameters():
        p.sequence_parallel = True
    norm.weight.main_grad = torch.full((2,), tag)
    norm.bias.main_grad = torch.full((2,), tag, dtype=torch.bfloat16)  # a second dtype: a second collective
    shard = torch.nn.Linear(2, 2, bias=False)  # a TP shard: its gradient is complete, never summed
    shard.weight.tensor_model_parallel = True
    shard.weight.main_grad = torch.full((2, 2), tag)
    plain = torch.nn.Linear(1, 1, bias=False)  # replicated, full-sequence input: already complete
    plain.weight.grad = torch.full((1, 1), tag)
    via_grad = torch.nn.Linear(1, 1, bias=False)  # no DDP wrapper: .grad is the gradient
    via_grad.weight.sequence_parallel = True
    via_grad.weight.grad = torch.full((1, 1), tag)
    tied = torch.nn.Linear(1, 1, bias=False)
    tied.weight.shared_embedding = True
    tied.weight.main_grad = torch.full((1, 1), tag)
    chunk = _Wrapped(torch.nn.ModuleList([norm, shard, plain, via_grad, tied]))
    finalize_model_grads([chunk], ps)
    return (ps.tp_rank, ps.pp_rank, norm.weight.main_grad, norm.bias.main_grad, shard.weight.main_grad,
            plain.weight.grad, via_grad.weight.grad, tied.weight.main_grad)


def test_finalize_model_grads_sums_sequence_parallel_over_tp_and_tied_over_pp():
    for tp, pp, norm_w, norm_b, shard, plain, via_grad, tied in run_distributed(_finalize_tp_pp, 4, timeout=60):
        tag = 1.0 + tp + 10 * pp
        tp_sum = (1.0 + 10 * pp) + (2.0 + 10 * pp)  # the two TP ranks of this stage
        pp_sum = (1.0 + tp) + (11.0 + tp)  # the first and last stage of this TP rank
        where = f"tp {tp} pp {pp}"
        assert torch.equal(norm_w, torch.full((2,), tp_sum)), f"{where}: sequence-parallel grad not summed over TP"
        assert norm_b.dtype == torch.bfloat16 and torch.equal(norm_b, torch.full((2,), tp_sum, dtype=torch.bfloat16))
        assert torch.equal(via_grad, torch.full((1, 1), tp_sum)), f"{where}: .grad of a sequence-parallel param"
        assert torch.equal(shard, torch.full((2, 2), tag)), f"{where}: a TP shard's grad must not be summed"
        assert torch.equal(plain, torch.full((1, 1), tag)), f"{where}: a replicated grad must not be summed"
        assert torch.equal(tied, torch.full((1, 1), pp_sum)), f"{where}: tied grad summed over the wrong group"


def _changed_after_dp_sync(tp, pp):
    ps = parallel_state.initialize_model_parallel(tp, pp)
    params = {name: torch.nn.Parameter(torch.zeros(1)) for name in ("plain", "sequence_parallel", "shared_embedding")}
    params["sequence_parallel"].sequence_parallel = True
    params["shared_embedding"].shared_embedding = True
    return {(name, per_token): changed_after_dp_sync(p, ps, per_token)
            for name, p in params.items() for per_token in (False, True)}


def test_changed_after_dp_sync_names_the_gradients_finalize_changes():
    """--overlap-cpu-optimizer-d2h-h2d copies a bucket's reduced gradient early only when no parameter in it
    is changed after the DP sync: sequence-parallel grads at TP > 1 (summed over TP), the tied embedding
    across stages, and every gradient under per-token loss (divided by the token count)."""
    expected = {(1, 1): set(), (2, 1): {"sequence_parallel"}, (1, 2): {"shared_embedding"}}
    for (tp, pp), changed in expected.items():
        for result in run_distributed(_changed_after_dp_sync, tp * pp, tp, pp, timeout=60):
            assert result == {(name, per_token): per_token or name in changed
                              for name in ("plain", "sequence_parallel", "shared_embedding")
                              for per_token in (False, True)}, (tp, pp)
