"""Microbatch calculator: counts, ramp-up, and errors that name the flags to change."""
import pytest

from megatron_core.microbatches import MicrobatchCalculator, check_interleaved_microbatches


def test_constant_global_batch():
    calc = MicrobatchCalculator(global_batch_size=64, micro_batch_size=4, data_parallel_size=2)
    assert (calc.num_microbatches, calc.current_global_batch_size) == (8, 64)
    calc.update(10_000)
    assert calc.num_microbatches == 8


def test_global_batch_not_divisible_names_the_flags():
    with pytest.raises(ValueError, match=r"--global-batch-size 30 is not divisible by --micro-batch-size 4 x "
                                         r"data-parallel size 2 = 8"):
        MicrobatchCalculator(global_batch_size=30, micro_batch_size=4, data_parallel_size=2)
    with pytest.raises(ValueError, match="--micro-batch-size must be >= 1"):
        MicrobatchCalculator(global_batch_size=8, micro_batch_size=0, data_parallel_size=1)


def test_rampup_follows_megatron():
    # start 16, +16 per increment up to 64: 3 increments spread over 300 samples (one per 100).
    calc = MicrobatchCalculator(global_batch_size=64, micro_batch_size=2, data_parallel_size=2,
                                rampup_batch_size=[16, 16, 300])
    seen = []
    for consumed in (0, 99, 100, 199, 200, 299, 300, 10_000):
        calc.update(consumed)
        seen.append((calc.current_global_batch_size, calc.num_microbatches))
    assert seen == [(16, 4), (16, 4), (32, 8), (32, 8), (48, 12), (48, 12), (64, 16), (64, 16)]


def test_rampup_errors():
    with pytest.raises(ValueError, match="does not reach --global-batch-size 64"):
        MicrobatchCalculator(64, 2, 1, rampup_batch_size=[16, 10, 100])
    with pytest.raises(ValueError, match="takes three values"):
        MicrobatchCalculator(64, 2, 1, rampup_batch_size=[16, 16])
    # 24 is reached during the ramp and is not a multiple of micro 4 x DP 4 = 16: fail up front.
    with pytest.raises(ValueError, match=r"global batch size 24 \(reached during --rampup-batch-size\)"):
        MicrobatchCalculator(64, 4, 4, rampup_batch_size=[16, 8, 100])
    # The ramp's last batch is --global-batch-size itself: 16 fits micro 4 x DP 2 = 8, the final 20 does not.
    with pytest.raises(ValueError, match=r"^--global-batch-size 20 is not divisible by --micro-batch-size 4 x "):
        MicrobatchCalculator(20, 4, 2, rampup_batch_size=[16, 4, 100])


def test_interleaving_needs_microbatches_divisible_by_pipeline_size():
    check_interleaved_microbatches(8, 4, 2)
    check_interleaved_microbatches(6, 4, None)  # plain 1F1B takes any count
    with pytest.raises(ValueError, match=r"microbatches \(6\) to be a multiple of --pipeline-model-parallel-size 4"):
        check_interleaved_microbatches(6, 4, 2)
    # The calculator checks every batch size the ramp-up will reach before the first step.
    with pytest.raises(ValueError, match=r"microbatches \(2\) to be a multiple of --pipeline-model-parallel-size 4"):
        MicrobatchCalculator(16, 2, 1, rampup_batch_size=[4, 4, 100], pipeline_model_parallel_size=4,
                             virtual_pipeline_model_parallel_size=2)
    # ... and only those: a ramp of increment 1 that starts at the global batch reaches 4 (4 microbatches,
    # a multiple of 2 stages) and never 5.
    assert MicrobatchCalculator(4, 1, 1, rampup_batch_size=[4, 1, 100], pipeline_model_parallel_size=2,
                                virtual_pipeline_model_parallel_size=2).num_microbatches == 4
