"""ZeRO-2/3 partitioned gradients with per-token loss averaging, against one process.

Under ZeRO-2/3 the full gradients are freed bucket by bucket during backward, so everything
``finalize_model_grads`` does after the DP sync acts on this rank's pieces of ``grad_shard``: here
the tied-embedding all-reduce between the first and the last pipeline stage and the division by
the global token count (``calculate_per_token_loss``, Megatron-LM's ``--calculate-per-token-loss``);
and ``training.health``'s nan check reads the shards.
GPT-2 at DP 2 x PP 2 with 2 accumulated microbatches (each reduced into the shard), 3 SGD steps
without clipping: parameters equal the serial run's on the global batch (fp32, relative 1e-5; SGD as in
``test_ddp_gpt``, since PP changes the summation order). ZeRO-0 runs the same loop as a control.
"""
import dataclasses

import pytest
import torch
from ddp_common import MICRO_BATCH, build, expected_param, result_of, serial_reference
from equivalence import assert_rel_close
from harness import run_distributed
from test_ddp_gpt import SEQ, GPTSpec

from megatron_core.distributed import finalize_model_grads, no_sync_func
from megatron_core.distributed.finalize_model_grads import reduced_grads
from megatron_core.pipeline_parallel import get_forward_backward_func
from megatron_core.training.health import TrainingDivergedError, check_loss_and_grads

STEPS, MICROBATCHES = 3, 2
# A clipping threshold never reached (0 would clip to zero in the serial run): clipping would hide a
# gradient off by a constant factor, such as a missing division by the token count.
SGD = {"optimizer": "sgd", "sgd_momentum": 0.9, "lr": 0.05, "clip_grad": 1e6}


def _loss_sum(batch, per_token_loss):
    loss_sum = (per_token_loss * batch["loss_mask"]).sum()
    num_tokens = batch["loss_mask"].sum().to(torch.int64)
    return loss_sum, num_tokens, {"lm loss": (loss_sum.detach(), num_tokens)}


@dataclasses.dataclass
class PerTokenGPT(GPTSpec):
    """GPT-2 whose loss is the sum over the global batch's tokens divided by their count."""

    def microbatches(self, step, count, micro_batch_size):
        batches = super().microbatches(step, count, micro_batch_size)
        tokens = sum(b["loss_mask"].sum() for b in batches)
        return [{**b, "global_tokens": tokens, "count": count} for b in batches]

    def loss(self, model, batch):
        # serial_reference backpropagates loss / count: this makes it loss_sum / global tokens
        loss_sum = _loss_sum(batch, model(batch["tokens"], labels=batch["labels"]))[0]
        return loss_sum * batch["count"] / batch["global_tokens"]

    @staticmethod
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch["tokens"], labels=batch["labels"]), lambda out: _loss_sum(batch, out)


def _train(zero_stage: int) -> dict:
    spec = PerTokenGPT("gpt2")
    ps, chunks, wrapped, optimizer = build({"pp": 2}, spec, {"zero_stage": zero_stage, "overlap_grad_reduce": True,
                                                             "bucket_size": 2000, "calculate_per_token_loss": True},
                                           SGD)
    schedule = get_forward_backward_func(ps)
    for step in range(STEPS):
        optimizer.zero_grad()
        batches = spec.microbatches(step, MICROBATCHES * ps.dp_size, MICRO_BATCH)
        mine = batches[ps.dp_rank * MICROBATCHES:(ps.dp_rank + 1) * MICROBATCHES]
        schedule(forward_step_func=spec.forward_step, data_iterator=iter(mine), model=wrapped,
                 num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                 no_sync_func=no_sync_func(wrapped), calculate_per_token_loss=True,
                 finalize_model_grads_func=lambda model, num_tokens=None: finalize_model_grads(
                     model, parallel_state=ps, num_tokens=num_tokens))
        ok, _, _ = optimizer.step()
        assert ok
    for w in wrapped:
        w.gather_all_params()
    result = result_of(ps, spec, chunks, [], [])
    ps.destroy()
    return result


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_per_token_loss_and_tied_embedding_on_gradient_shards_equal_one_process(zero_stage):
    spec = PerTokenGPT("gpt2")
    (ref,) = run_distributed(serial_reference, 1, spec, STEPS, 2 * MICROBATCHES, SGD, timeout=60)
    results = run_distributed(_train, 4, zero_stage, timeout=120)
    seen = set()
    for rank, res in enumerate(results):
        for name, value in res["params"].items():
            seen.add(name)
            assert_rel_close(value, expected_param(ref, name, res), 1e-5,
                             f"ZeRO-{zero_stage} rank {rank} {name} after {STEPS} steps")
    assert seen == set(ref["params"])


def _check_after_backward(zero_stage: int, poison_rank: int | None):
    spec = PerTokenGPT("gpt2")
    ps, chunks, wrapped, optimizer = build({}, spec, {"zero_stage": zero_stage, "bucket_size": 2000}, SGD)
    optimizer.zero_grad()
    (batch,) = spec.microbatches(0, 1, MICRO_BATCH)
    spec.loss(wrapped[0], batch).backward()
    finalize_model_grads(wrapped, parallel_state=ps)
    main_grads = [getattr(p, "main_grad", None) for p in chunks[0].parameters()]
    if ps.dp_rank == poison_rank:
        reduced_grads(wrapped)[-1].view(-1)[0] = float("nan")
    try:
        check_loss_and_grads(1, {"lm loss": 1.0}, wrapped, optimizer)
        outcome = "ok"
    except TrainingDivergedError as exc:
        outcome = str(exc)
    ps.destroy()
    return outcome, all(g is None for g in main_grads)


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_nan_check_reads_the_gradient_shards_on_every_rank(zero_stage):
    """``--check-for-nan-in-loss-and-grad`` after backward: under ZeRO-2/3 ``param.main_grad`` is None
    (its storage is freed; reading the old view crashed ``pretrain_gpt.py``) and the check reads the
    shards instead, so a nan on one rank's shard stops every rank."""
    for poison_rank in (None, 1):
        for outcome, main_grads_none in run_distributed(_check_after_backward, 2, zero_stage, poison_rank,
                                                         timeout=60):
            assert main_grads_none == (zero_stage >= 2)
            if poison_rank is None:
                assert outcome == "ok"
            else:
                assert outcome.startswith("iteration 1: a gradient is inf or nan"), outcome
