"""Data parallelism needs the same model on every DP rank; a rank-dependent one is refused in one line.

The gradient buckets and ZeRO shards are laid out from each rank's own parameters, so before the check a
model whose last layer had ``3 + rank`` outputs was wrapped without any error at ZeRO 0 and 3 (the buffers
pad to the same size) and its ranks then broadcast and reduced unrelated elements. Now the wrapper, and so
``megatron_core.initialize`` too, raises :class:`ConfigError` on every rank naming the first parameter
that differs; TP ranks (same names and shapes, other values) are not compared, only DP ranks.
"""
import pytest
import torch
from harness import run_distributed

import megatron_core
from megatron_core import parallel_state
from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron_core.errors import ConfigError


def _model(rank: int, change: str) -> torch.nn.Module:
    torch.manual_seed(0)
    outputs = 3 + (rank if change == "shape" else 0)
    if change.startswith("odd") and rank == int(change.removeprefix("odd")):  # "oddN": rank N alone differs
        outputs += 1
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, outputs))
    if change == "frozen" and rank == 1:
        model[0].bias.requires_grad_(False)
    if change == "dtype" and rank == 1:
        model[1].to(torch.float64)
    if change == "extra" and rank == 1:
        model.append(torch.nn.Linear(3, 3))
    return model


def _wrap(zero: int, change: str, tp: int = 1) -> str:
    import torch.distributed as dist
    ps = parallel_state.initialize_model_parallel(tp, 1)
    try:
        DistributedDataParallel(DistributedDataParallelConfig(zero_stage=zero), _model(dist.get_rank(), change), ps)
    except ConfigError as exc:
        return str(exc)
    return "wrapped"


@pytest.mark.parametrize("zero,change,odd,reference", [
    (0, "shape", "'1.weight [4, 4] float32'", "'1.weight [3, 4] float32'"),
    (3, "shape", "'1.weight [4, 4] float32'", "'1.weight [3, 4] float32'"),
    (1, "frozen", "'0.bias [4] float32 frozen'", "'0.bias [4] float32'"),
    (2, "dtype", "'1.weight [3, 4] float64'", "'1.weight [3, 4] float32'"),
    (0, "extra", "'2.weight [3, 3] float32'", "no more parameters"),
])
def test_rank_dependent_model_is_refused_on_every_rank(zero, change, odd, reference):
    expected = f"DP rank 1 (global rank 1) has {odd} where DP rank 0 has {reference}"
    messages = run_distributed(_wrap, 2, zero, change, timeout=60)
    for message in messages:
        assert message.startswith("the model differs across data-parallel ranks") and expected in message
        assert "build the same model on every rank" in message and "\n" not in message


def test_the_rank_named_is_the_odd_one_out():
    """The model most DP ranks hold is the reference: with 3 ranks where only rank 0 differs, rank 0 is
    named (before, every rank but 0 was compared with rank 0, and rank 1 was blamed). Under TP 2 x DP 2 the
    DP rank and the global rank differ, and both are given."""
    for message in run_distributed(_wrap, 3, 0, "odd0", timeout=60):
        assert ("at parameter 2, DP rank 0 (global rank 0) has '1.weight [4, 4] float32' where DP rank 1 has "
                "'1.weight [3, 4] float32' (as 2 of 3 DP ranks do)") in message, message
    # TP 2 x DP 2: global rank 3 differs; its DP group is global ranks 1 and 3 (a tie: DP rank 0 is the reference).
    messages = run_distributed(_wrap, 4, 0, "odd3", 2, timeout=60)
    assert messages[0] == messages[2] == "wrapped"
    for message in (messages[1], messages[3]):
        assert "DP rank 1 (global rank 3) has '1.weight [4, 4] float32' where DP rank 0 has" in message, message


def test_same_model_wraps_and_tp_ranks_are_not_compared():
    # 2 ranks as TP 2 (DP 1): the wrapper compares nothing, as TP shards legitimately differ.
    def body(tp: int, change: str) -> str:
        import torch.distributed as dist
        ps = parallel_state.initialize_model_parallel(tp, 1)
        DistributedDataParallel(DistributedDataParallelConfig(zero_stage=3), _model(dist.get_rank(), change), ps)
        return "wrapped"
    assert run_distributed(body, 2, 1, "none", timeout=60) == ["wrapped", "wrapped"]
    assert run_distributed(body, 2, 2, "shape", timeout=60) == ["wrapped", "wrapped"]


def test_engine_initialize_refuses_a_rank_dependent_model():
    def body() -> str:
        import torch.distributed as dist
        config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 3}}
        try:
            megatron_core.initialize(_model(dist.get_rank(), "shape"), config=config)
        except ConfigError as exc:
            return str(exc)
        return "initialized"
    for message in run_distributed(body, 2, timeout=60):
        assert message.startswith("the model differs across data-parallel ranks"), message


def _pretrain_with_rank3_extra() -> str:
    """pretrain_gpt's training under TP 2 x DP 2 with a model provider that adds a layer on global rank 3
    alone: only the DP group of ranks 1 and 3 differs."""
    import torch.distributed as dist

    import pretrain_gpt
    from megatron_core.training.arguments import config_from_args, parse_args
    from megatron_core.training.arguments.validate import validate_args
    from megatron_core.training.pretrain import pretrain

    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "255", "--eval-iters", "0", "--num-workers", "0",
            "--tensor-model-parallel-size", "2", "--distributed-timeout-minutes", "1"]
    config = config_from_args(validate_args(parse_args(argv), dist.get_world_size()))

    def provider(*args):
        chunks = pretrain_gpt.model_provider(*args)
        if dist.get_rank() == 3:
            chunks[0].extra = torch.nn.Linear(2, 2)
        return chunks
    try:
        pretrain(config, provider, pretrain_gpt.forward_step)
    except ConfigError as exc:
        return str(exc)
    return "trained"


def test_a_difference_in_one_dp_group_stops_every_rank():
    """Ranks 0 and 2 (a DP group with the same model) are told too, instead of waiting in their next
    collective for ranks 1 and 3 until the timeout."""
    for message in run_distributed(_pretrain_with_rank3_extra, 4, timeout=120):
        assert "the model differs across data-parallel ranks" in message and "(global rank 3)" in message, message


def test_engine_a_difference_in_one_dp_group_stops_every_rank():
    """The same under megatron_core.initialize with AutoTP 2 on 4 ranks (Hugging Face GPT-2): only global
    rank 3's model has an extra parameter."""
    def body() -> str:
        import torch.distributed as dist
        from engine_common import ds_config, make_model
        model = make_model("gpt2")
        if dist.get_rank() == 3:
            model.extra = torch.nn.Linear(2, 2)
        try:
            megatron_core.initialize(model, config=ds_config(2, 1, 1, "gpt2", tensor_parallel={"autotp_size": 2}))
        except ConfigError as exc:
            return str(exc)
        return "initialized"
    for message in run_distributed(body, 4, timeout=120):
        assert "the model differs across data-parallel ranks" in message and "(global rank 3)" in message, message
