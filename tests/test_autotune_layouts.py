"""The autotuner's search space: the layouts ``enumerate_layouts`` offers, ``check_layout``'s reasons and
``Layout.describe``, the name of a layout in the search's table (test_autotune_search.py has the ranking, the
memory and time predictions and the CLI)."""
import dataclasses

import pytest

from megatron_core.autotune import cli
from megatron_core.autotune.layout import Layout
from megatron_core.autotune.search import check_layout, enumerate_layouts
from megatron_core.microbatches import MicrobatchCalculator
from megatron_core.training.arguments import config_from_args, parse_args
from megatron_core.training.arguments.validate import validate_args

# pretrain_gpt.py's flags of the model (tests/test_autotune_search.py's FLAGS with a global batch of 8)
FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--global-batch-size", "8", "--mock-data", "--vocab-size", "255", "--lr", "1e-3", "--train-iters", "2"]


def _spec():
    return cli.model_spec(cli.build_parser().parse_args(FLAGS))


def test_every_layout_offered_passes_pretrain_gpts_argument_checks():
    """ZeRO over one DP rank is stage 0 and offload pairs with a ZeRO stage (pretrain_gpt.py refuses
    --optimizer-cpu-offload without one), so neither is offered; every layout offered over 2 ranks, with
    its flags, passes pretrain_gpt.py's argument checks and maps onto the run's configs."""
    spec = _spec()
    layouts = enumerate_layouts(spec, 2, [2])
    assert {(lay.zero_stage, lay.offload) for lay in layouts if lay.dp == 1} == {(0, False)}
    assert {(lay.zero_stage, lay.offload) for lay in layouts if lay.dp == 2} == {
        (0, False), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True)}
    for lay in (lay for lay in layouts if check_layout(spec, lay) is None):
        args = validate_args(parse_args(FLAGS + cli.layout_flags(spec, lay)), world_size=lay.world_size)
        ddp = config_from_args(args).ddp
        assert (ddp.zero_stage, args.optimizer_cpu_offload) == (lay.zero_stage, lay.offload), lay.describe()


def test_the_last_batch_of_a_rampup_is_checked_too():
    """--rampup-batch-size 4 2 16 to 8 trains with batches 4, 6 and 8: micro batch 2 x DP 2 splits 4 and 8 but not
    6, the last one before the full batch, which pretrain_gpt.py's MicrobatchCalculator refuses."""
    spec = dataclasses.replace(_spec(), rampup_batch_size=(4, 2, 16))
    assert spec.batch_sizes() == [4, 6, 8]
    assert check_layout(spec, Layout(dp=2, micro_batch_size=2)) == \
        "global batch size 6 (reached during --rampup-batch-size) not divisible by micro batch 2 x DP 2"
    with pytest.raises(ValueError, match="global batch size 6"):
        MicrobatchCalculator(8, 2, 2, [4, 2, 16], 1, None)
    assert check_layout(spec, Layout(dp=1, micro_batch_size=2)) is None


def test_describe_names_every_choice_so_the_table_tells_layouts_apart():
    assert Layout(tp=2, pp=2, dp=1, vpp=2, micro_batch_size=2, recompute="full", sequence_parallel=True,
                  recompute_method="block", recompute_num_layers=2).describe() == "tp2 pp2 v2 dp1 z0 mb2 full block2 sp"
    assert Layout(dp=2, zero_stage=1, recompute="selective", offload=True).describe() == "tp1 pp1 dp2 z1 mb1 sel off"
    layouts = enumerate_layouts(_spec(), 4)
    assert len({lay.describe() for lay in layouts}) == len(layouts)
