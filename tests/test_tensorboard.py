"""--tensorboard-dir: pretrain_gpt.py writes Megatron-LM's scalars every --tensorboard-log-interval
iterations and the validation scalars at every evaluation, read back from the event files with
TensorBoard's own EventAccumulator."""
import math

import pytest
from harness import run_distributed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the test extra
from test_pretrain import TINY, _logged, _train


def _scalars(directory):
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_scalars_follow_the_tensorboard_log_interval(tmp_path):
    argv = [*TINY, "--num-layers", "1", "--train-iters", "6", "--log-interval", "3", "--eval-interval", "3",
            "--eval-iters", "1", "--tensorboard-dir", str(tmp_path), "--tensorboard-log-interval", "2"]
    result = _logged(run_distributed(_train, 1, argv, timeout=120))
    scalars = _scalars(tmp_path)
    steps = [2, 4, 6]  # iterations divisible by 2; global batch 8 samples
    for tag in ("lm loss", "learning-rate", "batch-size", "loss-scale", "grad-norm"):
        assert [s for s, _ in scalars[tag]] == steps, (tag, scalars[tag])
    assert [s for s, _ in scalars["lm loss vs samples"]] == [8 * s for s in steps]
    for (step, value) in scalars["lm loss"]:
        assert value == pytest.approx(result.losses[step - 1], rel=1e-6), step
    assert [v for _, v in scalars["batch-size"]] == [8.0] * 3
    evaluated = sorted(result.val_losses)
    assert [s for s, _ in scalars["lm loss validation"]] == evaluated == [3, 6]
    for (step, value), (_, ppl) in zip(scalars["lm loss validation"], scalars["lm loss validation ppl"], strict=True):
        assert value == pytest.approx(result.val_losses[step], rel=1e-6)
        assert ppl == pytest.approx(math.exp(result.val_losses[step]), rel=1e-5)
    assert [s for s, _ in scalars["lm loss validation vs samples"]] == [8 * s for s in evaluated]
    # The test split (the mock data's default --split 969,30,1 has one): once, at the end, under its own tags.
    assert scalars["lm loss test"] == [(6, pytest.approx(result.test_loss, rel=1e-6))]
    assert scalars["lm loss test ppl"] == [(6, pytest.approx(math.exp(result.test_loss), rel=1e-5))]


def _writer_without_tensorboard(directory):
    import sys

    from megatron_core.training.training_log import make_tensorboard_writer

    sys.modules["torch.utils.tensorboard"] = None  # this forked rank only: as if tensorboard were not installed
    lines = []
    return make_tensorboard_writer(directory, True, lines.append), lines


def test_without_tensorboard_one_line_and_no_writer(tmp_path):
    """pip install without the test extra: training goes on, one line says how to get the events."""
    ((writer, lines),) = run_distributed(_writer_without_tensorboard, 1, str(tmp_path / "tb"), timeout=60)
    assert writer is None
    expected = f"> tensorboard is not installed (pip install tensorboard): not writing events to {tmp_path / 'tb'}"
    assert lines == [expected]
    assert not (tmp_path / "tb").exists()


def _error_of(argv):
    import pretrain_gpt
    from megatron_core.errors import ConfigError

    try:
        pretrain_gpt.main(argv)
    except ConfigError as exc:
        return str(exc)
    return None


def test_a_directory_that_cannot_be_written_is_one_line_on_every_rank(tmp_path):
    """Under a file: SummaryWriter's NotADirectoryError traceback on the logging rank (the last stage, rank 1
    here) while rank 0 went on into its first pipeline exchange."""
    (tmp_path / "file").write_text("x")
    argv = [*TINY, "--num-layers", "2", "--train-iters", "1", "--pipeline-model-parallel-size", "2",
            "--tensorboard-dir", str(tmp_path / "file" / "tb")]
    errors = run_distributed(_error_of, 2, argv, timeout=60)
    message = f"--tensorboard-dir {tmp_path / 'file' / 'tb'} cannot be written (Not a directory); give a directory"
    assert errors[1].startswith(message), errors
    assert errors[0] == f"(on rank 1) {errors[1]}", errors
