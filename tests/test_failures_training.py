"""Issue #14, silent wrong results: NaN stops a run, zero-token batches, schedules, eval-only, extending a run.

Every run is the one tiny model below, in process (``pretrain_gpt.main`` in a forked rank).
"""
import os

import numpy as np
import pytest
import torch
from harness import run_distributed

import pretrain_gpt
from megatron_core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron_core.training import checkpoint_io as io

TINY = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
        "--mock-data", "--vocab-size", "63", "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "100",
        "--num-workers", "0", "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "3"]
LEGACY = ["--ckpt-format", "torch"]  # tests that read or damage Megatron-LM's legacy per-rank files


def _run(argv):
    """``main(argv)``: the result on the logging rank, or ``"Type: message"`` for an error."""
    try:
        result = pretrain_gpt.main(argv)
    except ValueError as exc:
        return f"{type(exc).__name__}: {exc}"
    return result if result.is_logging_rank else None


def _one(argv, world=1):
    return [r for r in run_distributed(_run, world, argv, timeout=120) if r is not None][0]


def _without(argv, *flags):
    """``argv`` less each flag in ``flags`` and its one value."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def _weights(ckpt, iteration):
    state = io.load_file(os.path.join(io.iteration_dir(ckpt, iteration), "mp_rank_00", io.MODEL_FILENAME))
    return state["model"]


# ---- 1. NaN stops training ---------------------------------------------------------------------------
@pytest.mark.parametrize("precision", [[], ["--bf16"]])
def test_nan_loss_stops_the_run_naming_the_iteration_and_saves_nothing_bad(tmp_path, precision):
    ckpt = str(tmp_path / "ckpt")
    argv = TINY + LEGACY + precision + ["--lr", "1e30", "--lr-decay-style", "constant", "--train-iters", "12",
                                        "--save", ckpt, "--save-interval", "1", "--clip-grad", "0",
                                        "--weight-decay", "0"]
    message = _one(argv)
    assert isinstance(message, str) and message.startswith("TrainingDivergedError: iteration "), message
    assert "is inf or nan" in message and "not applied" in message
    for iteration in io.complete_iterations(ckpt):  # whatever was saved before the stop is finite
        assert all(torch.isfinite(t).all() for t in _weights(ckpt, iteration).values() if t.is_floating_point())



def test_without_the_nan_check_a_diverged_model_is_still_not_saved(tmp_path):
    """--no-check-for-nan-in-loss-and-grad lets a non-finite step land; the save is the last guard: it names
    the weight and publishes nothing for that iteration."""
    ckpt = str(tmp_path / "ckpt")
    argv = TINY + LEGACY + ["--no-check-for-nan-in-loss-and-grad", "--lr", "1e30", "--lr-decay-style", "constant",
                            "--train-iters", "12", "--save", ckpt, "--save-interval", "1", "--clip-grad", "0",
                            "--weight-decay", "0"]
    message = _one(argv)
    assert isinstance(message, str) and message.startswith("TrainingDivergedError: not saving iteration "), message
    assert "holds inf or nan; resume from the last good checkpoint" in message, message
    iteration = int(message.split("not saving iteration ")[1].split(":")[0])
    assert io.complete_iterations(ckpt) == list(range(1, iteration)), (io.complete_iterations(ckpt), message)
    for saved in io.complete_iterations(ckpt):
        assert all(torch.isfinite(t).all() for t in _weights(ckpt, saved).values() if t.is_floating_point())


@pytest.mark.parametrize("how", [["--no-load-optim"], ["--finetune"]])
def test_fp32_main_params_follow_weights_loaded_without_the_optimizer(tmp_path, how):
    """The distributed optimizer's fp32 main shard is built from the initial weights; after a load without
    its state it must take the loaded ones, or the first step writes init + update back into the model.
    Reference: the plain optimizer (its parameters are the model's), the same Adam math at DP 1."""
    ckpt = str(tmp_path / "ckpt")
    base = TINY + LEGACY + ["--lr-decay-style", "constant", "--weight-decay", "0", "--eval-iters", "0"]
    assert _one(base + ["--save", ckpt, "--train-iters", "3"]).saved_iterations == [3]
    resumed = {}
    for optimizer in ([], ["--use-distributed-optimizer"]):
        result = _one(base + ["--load", ckpt, "--train-iters", "6", *how, *optimizer])
        assert not isinstance(result, str), result
        resumed[bool(optimizer)] = result.losses
    assert len(resumed[True]) == (6 if how == ["--finetune"] else 3), resumed
    torch.testing.assert_close(torch.tensor(resumed[True]), torch.tensor(resumed[False]), rtol=1e-5, atol=0)

def test_a_checkpoint_with_a_nan_weight_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    assert _one(TINY + LEGACY + ["--save", ckpt]).saved_iterations == [2]
    path = os.path.join(io.iteration_dir(ckpt, 2), "mp_rank_00", io.MODEL_FILENAME)
    state = io.load_file(path)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() == 2)
    state["model"][name].view(-1)[0] = float("nan")
    torch.save(state, path)
    os.remove(os.path.join(io.iteration_dir(ckpt, 2), io.MANIFEST_FILENAME))  # sizes changed: drop the manifest
    message = _one(TINY + ["--load", ckpt, "--train-iters", "4"])
    assert isinstance(message, str) and f"weight {name} holds inf or nan" in message and path in message


def _all_eod_corpus(directory):
    """A real mmap dataset whose every token is the end-of-document token (id 63 for --vocab-size 63)."""
    prefix = os.path.join(directory, "eod_text_document")
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
        for _ in range(40):
            builder.add_item(np.full(9, 63, dtype=np.int64))
            builder.end_document()
        builder.finalize(prefix + ".idx")
    return prefix


def test_a_batch_with_every_label_masked_contributes_zero_loss_and_gradient(tmp_path):
    prefix = _all_eod_corpus(str(tmp_path))
    ckpt = str(tmp_path / "ckpt")
    base = [a for a in TINY if a != "--mock-data"] + ["--data-path", prefix, "--eod-mask-loss", "--weight-decay", "0",
                                                     "--save", ckpt, "--split", "90,10,0", "--tokenizer-type",
                                                     "NullTokenizer", *LEGACY]  # _weights reads legacy files
    start = _one(base + ["--train-iters", "1", "--lr", "0"])  # lr 0: iteration 1 leaves the initial weights
    assert not isinstance(start, str), start
    after = _one(base + ["--load", ckpt, "--train-iters", "3", "--override-opt-param-scheduler"])
    assert not isinstance(after, str), after
    before, now = _weights(ckpt, 1), _weights(ckpt, 3)
    for key, value in before.items():  # zero gradients: Adam moves nothing
        assert torch.equal(value, now[key]), key


def test_fp16_skipping_every_step_at_the_lowest_loss_scale_stops(tmp_path):
    # A loss scale of 2^100 overflows every fp16 gradient; it is also the minimum, so it cannot back off.
    argv = TINY + ["--fp16", "--initial-loss-scale", str(2.0 ** 100), "--min-loss-scale", str(2.0 ** 100),
                   "--train-iters", "50", "--max-skipped-iters-at-min-loss-scale", "4"]
    message = _one(argv)
    assert isinstance(message, str), message
    assert message.startswith("TrainingDivergedError: iteration 4: the last 4 fp16"), message


# ---- 4. schedules that cannot be meant ---------------------------------------------------------------
@pytest.mark.parametrize("extra,needle", [
    (["--lr-warmup-iters", "8", "--lr-decay-iters", "4", "--train-iters", "10"], "is not shorter than the decay"),
    (["--rampup-batch-size", "2", "2", "8", "--global-batch-size", "4", "--train-iters", "10"],
     "--rampup-batch-size needs sample-based training"),
])
def test_schedules_that_cannot_be_meant_are_refused(extra, needle):
    message = _one(TINY + extra)
    assert isinstance(message, str) and message.startswith("ConfigError: ") and needle in message, message


def test_a_run_shorter_than_its_warmup_is_warned(capfd):
    result = _one(TINY + ["--lr-warmup-iters", "10", "--lr-decay-iters", "20", "--train-iters", "2"])
    assert not isinstance(result, str), result
    expected = "warning: the run ends after 4 samples, inside the learning-rate warmup of 20 samples"
    assert expected in capfd.readouterr().out


# ---- 5. evaluation only ------------------------------------------------------------------------------
def test_eval_only_loads_any_checkpoint_without_a_schedule(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    trained = _one(TINY + ["--save", ckpt, "--lr-decay-style", "cosine", "--lr-warmup-iters", "1"])
    evaluated = _one(_without(TINY, "--lr", "--train-iters") + ["--load", ckpt, "--eval-only"])
    assert not isinstance(evaluated, str), evaluated
    assert evaluated.loaded_iteration == 2 and evaluated.val_losses[2] == pytest.approx(trained.val_losses[2], rel=1e-6)


# ---- 13. extending a run, rerunning a finished one -----------------------------------------------------
def test_extending_a_run_with_constant_weight_decay_is_accepted_and_a_finished_run_says_so(tmp_path, capfd):
    ckpt = str(tmp_path / "ckpt")
    schedule = ["--lr-decay-iters", "6", "--lr-decay-style", "linear", "--save", ckpt]
    _one(TINY + schedule)
    extended = _one(TINY + schedule + ["--load", ckpt, "--train-iters", "4"])
    assert not isinstance(extended, str), extended
    assert extended.loaded_iteration == 2 and extended.iteration == 4
    capfd.readouterr()
    again = _one(TINY + schedule + ["--load", ckpt, "--train-iters", "4"])
    assert again.exit_reason == "nothing-to-train"
    assert "> nothing to train: the checkpoint is at iteration 4 and --train-iters is 4" in capfd.readouterr().out
