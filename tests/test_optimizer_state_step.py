"""The optimizer step count gathered for a checkpoint is the world's, not one rank's.

``optimizer_state._step`` all-reduces (MAX) the step over every rank because a rank may hold no
optimizer state of its own (its parameters never got a step: torch's optimizers create state lazily,
at a parameter's first update), and rank 0 writes the step into ``common.pt``. Here rank 1 takes a
step and rank 0 does not: both must report step 1, not -1 ("before the first step"), which on resume
would leave every rank's Adam moments unloaded.
"""
from ddp_common import OPT
from harness import run_distributed
from test_ddp_gpt import GPTSpec

from megatron_core import parallel_state
from megatron_core.dist_checkpointing import load_dist_checkpoint, save_dist_checkpoint
from megatron_core.dist_checkpointing.optimizer_state import param_state_pieces
from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron_core.optimizer import OptimizerConfig, get_megatron_optimizer


def _build(spec):
    ps = parallel_state.ParallelState(1, 1)  # DP 2: each rank's optimizer is its own
    (chunk,) = spec.build_chunks(ps)
    wrapped = DistributedDataParallel(DistributedDataParallelConfig(), chunk, ps)
    return ps, wrapped, get_megatron_optimizer(OptimizerConfig(**OPT), [wrapped], ps)


def _gathered_step(directory):
    spec = GPTSpec("llama")
    ps, wrapped, optimizer = _build(spec)
    if ps.rank == 1:
        spec.loss(wrapped, spec.microbatches(0, 1, 2)[0]).backward()
        optimizer.step()
    _, keys, step = param_state_pieces(optimizer, ps, copy=False)
    held = len(optimizer.inner.state)
    save_dist_checkpoint(directory, 1, [wrapped], optimizer, None, ps)
    ps.destroy()
    ps, wrapped, optimizer = _build(spec)
    recorded = load_dist_checkpoint(directory, [wrapped], optimizer, None, ps)["optimizer"]["step"]
    loaded = {float(s["step"]) for s in optimizer.inner.state.values()}
    ps.destroy()
    return held, keys, step, recorded, loaded


def test_step_count_is_agreed_when_rank_0_has_no_optimizer_state(tmp_path):
    results = run_distributed(_gathered_step, 2, str(tmp_path), timeout=60)
    (held0, keys0, step0, recorded, loaded0), (held1, keys1, step1, _, loaded1) = results
    assert held0 == 0 and held1 > 0, "rank 0 must hold no optimizer state, rank 1 some"
    assert keys0 == keys1 == ["exp_avg", "exp_avg_sq"]
    assert step0 == step1 == 1.0, f"rank 0 reports step {step0}, rank 1 {step1}"
    assert recorded == 1.0, f"common.pt records step {recorded}"
    assert loaded0 == loaded1 == {1.0}, "the resumed optimizers must hold state at step 1 on every rank"
