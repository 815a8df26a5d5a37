"""pretrain_gpt.py under ZeRO-3 (and its flags): the one-process losses, resume, a real torchrun launch.

Follows ``test_pretrain``: the same tiny model and data, dropout off, losses compared per iteration
(fp32, relative 1e-5). Adam runs with a larger eps here, as in ``test_ddp_gpt``: the attention
key bias's gradient is rounding noise that Adam with eps 1e-8 would turn into full-size steps.
"""
import os
import re
import subprocess
import sys

import pytest
from harness import run_distributed
from test_pretrain import REPO, TINY, _logged, _train

from megatron_core.errors import ConfigError
from megatron_core.training.arguments import config_from_args, parse_args
from megatron_core.training.arguments.validate import validate_args

ARGS = [*TINY, "--train-iters", "6", "--eval-interval", "6", "--adam-eps", "1e-4"]


@pytest.fixture(scope="module")
def serial():
    return _logged(run_distributed(_train, 1, ARGS, timeout=120))


def _same_losses(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"iteration {i}: {a} vs one process {b}"


@pytest.mark.parametrize("world,extra", [
    (2, ["--zero-stage", "3", "--overlap-grad-reduce"]),
    (4, ["--data-parallel-sharding-strategy", "optim_grads_params", "--offload-param",
         "--stage3-prefetch-bucket-size", "0", "--nvme-offload-path", "{tmp}"]),
], ids=["dp2-zero3", "dp4-zero3-param-offload-nvme"])
def test_zero_layouts_reproduce_serial_losses(serial, world, extra, tmp_path):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    result = _logged(run_distributed(_train, world, ARGS + extra, timeout=180))
    _same_losses(result.losses, serial.losses)


@pytest.mark.parametrize("extra", [[], ["--nvme-offload-path", "{swap}"]], ids=["zero3", "zero3-nvme"])
def test_resume_under_zero3_equals_uninterrupted_run(serial, tmp_path, extra):
    (tmp_path / "swap").mkdir()
    extra = [a.replace("{swap}", str(tmp_path / "swap")) for a in extra]
    flags = ARGS + ["--zero-stage", "3", "--save", str(tmp_path / "ckpt"), "--save-interval", "3", *extra]
    first = _logged(run_distributed(_train, 2, flags + ["--exit-interval", "3"], timeout=180))
    resumed = _logged(run_distributed(_train, 2, flags + ["--load", str(tmp_path / "ckpt")], timeout=180))
    assert first.exit_reason == "exit-interval" and resumed.loaded_iteration == 3
    _same_losses(first.losses + resumed.losses, serial.losses)


def _config(args):
    return config_from_args(args)


def test_conflicting_zero_flags_are_one_line_errors():
    # The values as given, each with the stage it names (the strategy's name is what the user typed).
    bad = [(["--zero-stage", "2", "--data-parallel-sharding-strategy", "optim"],
            r"--zero-stage 2 \(ZeRO stage 2\) and --data-parallel-sharding-strategy optim \(ZeRO stage 1\)"),
           (["--zero-stage", "0", "--use-distributed-optimizer"], "--use-distributed-optimizer"),
           (["--zero-stage", "2", "--offload-param"], "--offload-param"),
           (["--overlap-param-gather"], "--overlap-param-gather"),
           (["--optimizer-cpu-offload"], "--optimizer-cpu-offload"),
           (["--nvme-offload-path", "/tmp"], "--nvme-offload-path"),
           (["--use-distributed-optimizer", "--overlap-cpu-optimizer-d2h-h2d"],
            "--overlap-cpu-optimizer-d2h-h2d .*--optimizer-cpu-offload")]
    for extra, flag in bad:
        with pytest.raises(ConfigError, match=flag) as info:
            _config(validate_args(parse_args(ARGS + extra), world_size=2))
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="--optimizer-offload-fraction"):
        _config(validate_args(parse_args(ARGS + ["--optimizer-offload-fraction", "1.5"]), world_size=2))
    ok = _config(validate_args(parse_args(ARGS + ["--data-parallel-sharding-strategy", "optim_grads"]),
                               world_size=2)).ddp
    assert ok.zero_stage == 2 and ok.reshard_after_forward and not ok.offload_param
    ok = _config(validate_args(parse_args(ARGS + ["--zero-stage", "3", "--no-reshard-after-forward",
                                                  "--stage3-param-persistence-threshold", "100"]),
                               world_size=2)).ddp
    assert (ok.zero_stage, ok.reshard_after_forward, ok.stage3_param_persistence_threshold) == (3, False, 100)


@pytest.mark.parametrize("world,extra", [
    # CPU offload with the overlapped host copies logs the losses of the run without offload
    (2, ["--zero-stage", "3", "--overlap-grad-reduce", "--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d"]),
    (4, ["--zero-stage", "3", "--nvme-offload-path"]),
], ids=["dp2-zero3-cpu-offload-overlap-d2h-h2d", "dp4-zero3-nvme"])
def test_torchrun_launch_equals_one_process(serial, world, extra, tmp_path):
    if extra[-1] == "--nvme-offload-path":
        extra = [*extra, str(tmp_path)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           os.path.join(REPO, "pretrain_gpt.py"), *ARGS, "--log-interval", "2", "--eval-iters", "1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data parallel {world}" in proc.stdout
    if "--overlap-cpu-optimizer-d2h-h2d" in extra:
        assert "ZeRO stage 3 + CPU offload (overlapped host copies)" in proc.stdout, proc.stdout[:2000]
    logged = [float(x) for x in re.findall(r"iteration +\d+/ +6 \|.*?lm loss: (\S+) \|", proc.stdout)]
    want = [sum(serial.losses[i:i + 2]) / 2 for i in (0, 2, 4)]
    assert len(logged) == 3, proc.stdout
    for got, mean in zip(logged, want, strict=True):
        assert got == pytest.approx(mean, rel=1e-5), (logged, want)
    if "--nvme-offload-path" in extra:
        assert os.listdir(tmp_path) == [], "a finished run leaves no swap files"


def test_nvme_offload_path_errors_are_one_line_before_training(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for path, words in [(tmp_path / "missing", "is not a directory; create it"),
                        (a_file, "is not a directory; it is a file")]:
        with pytest.raises(Exception, match=f"--nvme-offload-path {re.escape(str(path))} {words}") as info:
            run_distributed(_train, 1, ARGS + ["--zero-stage", "1", "--nvme-offload-path", str(path)], timeout=60)
        assert "ConfigError" in str(info.value)
