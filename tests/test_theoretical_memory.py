"""Megatron-LM's ``Theoretical memory footprints`` line: printed once by global rank 0, before the memory
report of the first progress line, with the autotuner's prediction for the first pipeline stage of the run's
layout (reference: the same prediction computed here from the autotune API, the layout written by hand)."""
import contextlib
import io
import re

import pytest
from harness import run_distributed
from test_pretrain import TINY

from megatron_core.autotune.activations import stage_activation_bytes
from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.autotune.memory import model_state_bytes
from megatron_core.autotune.search import predict_rank_memory
from megatron_core.training.arguments import build_parser
from megatron_core.training.arguments.to_config import transformer_config
from megatron_core.training.arguments.validate import validate_args

ARGV = TINY + ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "2"]
LINE = re.compile(r"^Theoretical memory footprints: weight and optimizer=([\d.]+) MB, activation=([\d.]+) MB, "
                  r"total=([\d.]+) MB$", re.MULTILINE)


def _train_and_output(argv):
    """This rank's own stdout during the run (print writes to sys.stdout, which the redirect replaces)."""
    import pretrain_gpt
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain_gpt.main(argv)
    return out.getvalue()


def _expected_mib(layout, argv=ARGV, global_batch=8):
    """Stage 0's weight-and-optimizer, activation and total MiB of TINY under ``layout`` (fp32, Adam)."""
    args = build_parser().parse_args(argv)
    validate_args(args, layout.world_size)
    # 255 tokens (NullTokenizer --vocab-size), sequence and positions 32, fp32 weights and grads
    spec = ModelSpec(transformer_config(args), 255, 32, 32, global_batch, 128, 4, 4)
    states = model_state_bytes(spec, layout, 0)
    weights = states.params + states.main_params + states.optimizer_state + max(
        states.grads + states.step_grad_copies, states.grads_in_backward)
    return [f"{b / 1024 ** 2:.2f}" for b in (weights, stage_activation_bytes(spec, layout, 0),
                                              predict_rank_memory(spec, layout, 0))]


@pytest.mark.parametrize("world,flags,layout", [
    (1, [], Layout(micro_batch_size=2)),
    (2, ["--pipeline-model-parallel-size", "2"], Layout(pp=2, micro_batch_size=2)),
    (2, ["--use-distributed-optimizer"], Layout(dp=2, zero_stage=1, micro_batch_size=2)),
])
def test_theoretical_memory_line_is_the_autotuners_prediction_printed_by_rank_0(world, flags, layout):
    outputs = run_distributed(_train_and_output, world, ARGV + flags, timeout=180)
    found = LINE.findall(outputs[0])
    assert found == [tuple(_expected_mib(layout))], outputs[0][-3000:]
    assert all(not LINE.search(text) for text in outputs[1:]), "printed by a rank other than 0"
    assert outputs[0].index("Theoretical memory footprints") < outputs[0].index("[Rank 0] (after 2 iterations)")


FULL = ["--recompute-granularity", "full", "--recompute-num-layers"]
# By samples, with the batch ramped from 2: at the first progress line (iteration 2, 4 samples) one microbatch
_BY_ITERS = ("--train-iters", "--lr-warmup-iters")
RAMPUP = [a for i, a in enumerate(ARGV) if a not in _BY_ITERS and ARGV[i - 1] not in _BY_ITERS] + [
    "--train-samples", "24", "--lr-warmup-samples", "4", "--rampup-batch-size", "2", "2", "12"]


@pytest.mark.parametrize("world,flags,layout,global_batch", [
    (1, FULL + ["2", "--recompute-method", "uniform"],
     Layout(micro_batch_size=2, recompute="full", recompute_num_layers=2), 8),
    (1, FULL + ["3", "--recompute-method", "block"],
     Layout(micro_batch_size=2, recompute="full", recompute_method="block", recompute_num_layers=3), 8),
    (2, ["--pipeline-model-parallel-size", "2"], Layout(pp=2, micro_batch_size=2), 2),
], ids=["uniform-2", "block-3", "pp2-rampup"])
def test_theoretical_memory_line_follows_recompute_method_and_rampup(world, flags, layout, global_batch):
    """Full recompute with --recompute-method and --recompute-num-layers (the checkpointed inputs of each
    group or layer, one group's activations rebuilt in backward), and under --rampup-batch-size the
    microbatches of the iteration the line is printed at, as Megatron-LM's get_num_microbatches() there (PP 2:
    one microbatch in flight on stage 0, not two). Before, full recompute was counted as uniform with one
    layer per checkpoint and the final --global-batch-size set the microbatches."""
    argv = (RAMPUP if global_batch != 8 else ARGV) + flags
    outputs = run_distributed(_train_and_output, world, argv, timeout=180)
    assert LINE.findall(outputs[0]) == [tuple(_expected_mib(layout, argv, global_batch))], outputs[0][-3000:]
