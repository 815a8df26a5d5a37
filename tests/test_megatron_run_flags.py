"""Megatron-LM's logging, garbage-collection and profiling flags of pretrain_gpt.py.

``--log-params-norm`` and ``--log-num-zeros-in-grad`` give one process's values under TP x PP and
ZeRO-1 (each element counted once), the norm equal to the saved weights' own; ``--manual-gc``
collects only where Megatron-LM does; ``--profile --use-pytorch-profiler`` writes one trace of the
iterations asked for on the ranks asked for; the TensorBoard extras are written; bad values are one line.
"""
import gc
import glob
import json
import math
import re

import pytest
import torch
from harness import run_distributed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the test extra
from test_pretrain import TINY, _logged, _train
from test_tensorboard import _error_of

NORMS = ["--log-params-norm", "--log-num-zeros-in-grad", "--train-iters", "6", "--eval-iters", "0",
         "--untie-embeddings-and-output-weights", "--vocab-size", "200",  # 56 padded rows: zero gradients
         # No key bias: its gradient is mathematically zero (a shift of every score in a softmax row), so
         # whether each of its elements reads exactly 0 or 1e-13 depended on the summation order.
         "--disable-bias-linear"]


def _scalars(directory):
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _norms(tmp_path, name, world, layout):
    tb = tmp_path / name
    run_distributed(_train, world, TINY + NORMS + layout + ["--tensorboard-dir", str(tb)], timeout=180)
    scalars = _scalars(tb)
    return scalars["params-norm"], scalars["num-zeros"]


def test_params_norm_and_zero_count_are_one_process_values_under_every_layout(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_distributed(_train, 1, TINY + NORMS + ["--tensorboard-dir", str(tmp_path / "one"), "--save", str(ckpt),
                                               "--ckpt-format", "torch"], timeout=180)
    scalars = _scalars(tmp_path / "one")
    params, zeros = scalars["params-norm"], scalars["num-zeros"]
    assert sorted(params) == sorted(zeros) == list(range(1, 7))  # --tensorboard-log-interval 1
    state = torch.load(ckpt / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    weights = [v for k, v in state.items() if "_extra_state" not in k and torch.is_floating_point(v)]
    assert params[6] == pytest.approx(math.sqrt(sum(float(w.double().pow(2).sum()) for w in weights)), rel=1e-6)
    assert all(z >= 56 * 32 for z in zeros.values())  # the padded embedding rows never get a gradient
    for name, world, layout in [
        ("tp2pp2", 4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
        ("zero1", 2, ["--use-distributed-optimizer"]),
    ]:
        got_params, got_zeros = _norms(tmp_path, name, world, layout)
        # Every zero is structural (rows of tokens absent from the batch, the padding): the same count.
        assert got_zeros == zeros, name
        for step, want in params.items():
            assert got_params[step] == pytest.approx(want, rel=1e-5), (name, step)


def test_the_progress_line_shows_params_norm_after_num_zeros(capfd):
    run_distributed(_train, 1, TINY + NORMS + ["--log-interval", "3"], timeout=120)
    lines = [line for line in capfd.readouterr().out.splitlines() if " iteration " in line and "params norm" in line]
    assert len(lines) == 2
    for line in lines:
        parts = [p.strip().split(":")[0] for p in line.split("|")]
        assert parts.index("grad norm") < parts.index("num zeros") < parts.index("params norm") \
            < parts.index("number of skipped iterations")


def _collections(argv):
    """The generation of every collection made while automatic collection was off (the manual ones; the
    setup before training runs with it on, as in Megatron-LM), the number made while it was on, and
    whether it is on again after the run."""
    import pretrain_gpt

    seen, automatic = [], []

    def callback(phase, info):
        if phase == "start":
            (automatic if gc.isenabled() else seen).append(info["generation"])

    gc.callbacks.append(callback)
    try:
        pretrain_gpt.main(argv)
    finally:
        gc.callbacks.remove(callback)
    return seen, len(automatic), gc.isenabled()


def test_manual_gc_collects_only_at_its_interval_and_around_evaluations():
    # 20 iterations, --manual-gc-interval 5, evaluations at 10 and 20 (TINY's --eval-interval 10): one full
    # collection at the start, one per interval, one before each periodic evaluation, a young one after it.
    ((seen, _, enabled),) = run_distributed(_collections, 1, TINY + ["--manual-gc", "--manual-gc-interval", "5"],
                                            timeout=120)
    assert sorted(seen) == [0, 0] + [2] * (1 + 4 + 2) and enabled
    ((seen, _, _),) = run_distributed(_collections, 1, TINY + ["--manual-gc", "--no-manual-gc-eval"], timeout=120)
    assert seen == [2]
    ((seen, automatic, _),) = run_distributed(_collections, 1, TINY, timeout=120)
    assert seen == [] and automatic > 0  # without the flag the collector runs on its own (6 to 150 times seen)


def test_pytorch_profiler_traces_the_asked_iterations_on_the_asked_ranks(tmp_path):
    argv = TINY + ["--train-iters", "6", "--eval-iters", "0", "--profile", "--use-pytorch-profiler",
                   "--profile-step-start", "2", "--profile-step-end", "4"]
    run_distributed(_train, 2, argv + ["--tensorboard-dir", str(tmp_path / "rank0")], timeout=180)
    run_distributed(_train, 2, argv + ["--tensorboard-dir", str(tmp_path / "both"), "--profile-ranks", "0", "1"],
                    timeout=180)
    assert len(glob.glob(str(tmp_path / "both" / "*.pt.trace.json"))) == 2
    (trace,) = glob.glob(str(tmp_path / "rank0" / "*.pt.trace.json"))
    with open(trace) as f:
        steps = {e["name"] for e in json.load(f)["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    # Megatron-LM's schedule: torch's ProfilerStep#k is the process's k-th iteration (its step() opens each one)
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}


def test_a_run_ending_inside_the_profile_window_still_writes_its_trace(tmp_path):
    # --profile-step-end past the last iteration: the schedule never reaches its end, so the trace of the
    # iterations recorded is written when the hooks close (profiler.stop()), not lost.
    from megatron_core.training.config import TrainingConfig
    from megatron_core.training.iteration_hooks import IterationHooks

    training = TrainingConfig(micro_batch_size=1, global_batch_size=1, train_iters=3, profile=True,
                              use_pytorch_profiler=True, profile_step_start=1, profile_step_end=5)
    with IterationHooks(training, 0, str(tmp_path), print) as hooks:
        for iteration in range(training.train_iters):
            hooks.before_iteration(iteration)
            torch.ones(4).sum()
            hooks.after_iteration(iteration + 1)
    (trace,) = glob.glob(str(tmp_path / "*.pt.trace.json"))
    with open(trace) as f:
        steps = {e["name"] for e in json.load(f)["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert "ProfilerStep#2" in steps  # the iterations recorded before the run ended
    assert not torch.autograd.profiler._is_profiler_enabled


def test_tensorboard_extras_and_losses_unchanged_by_emptying_the_cache(tmp_path, capfd):
    plain = _logged(run_distributed(_train, 1, TINY + ["--train-iters", "4", "--eval-iters", "0"], timeout=120))
    argv = TINY + ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "2", "--tensorboard-dir",
                   str(tmp_path), "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
                   "--log-world-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
                   "--tensorboard-queue-size", "5", "--empty-unused-memory-level", "2", "--timing-log-level", "1"]
    capfd.readouterr()
    result = _logged(run_distributed(_train, 1, argv, timeout=120))
    # --timing-log-level 1 prints Megatron-LM's default (minmax) block after the line (after the first line's
    # theoretical memory and memory report, as Megatron-LM's training_log orders them); one rank: min = max
    printed = {int(m.group(1)): float(m.group(3)) for m in re.finditer(
        r"iteration +(\d+)/.*\n(?:(?:\[Rank 0\] |Theoretical memory footprints: ).*\n)*"
        r"\(min, max\) time across ranks \(ms\):\n    forward-backward "
        r"\.+: \(([\d.]+), ([\d.]+)\)", capfd.readouterr().out)}
    assert sorted(printed) == [2, 4], printed
    assert result.losses == plain.losses
    scalars = _scalars(tmp_path)
    assert scalars["world-size"] == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    # every --tensorboard-log-interval (1) iterations, as Megatron-LM's Timers.write
    assert sorted(scalars["forward-backward-time"]) == sorted(scalars["optimizer-time"]) == [1, 2, 3, 4]
    assert all(0 < v < 60 for v in scalars["forward-backward-time"].values())
    for step, ms in printed.items():  # at the line's iterations the block's ms, in seconds
        seconds = scalars["forward-backward-time"][step]
        assert abs(seconds * 1000 - ms) <= 0.006, (step, seconds, printed)
    rss, peak = scalars["mem-rss-bytes"], scalars["mem-max-rss-bytes"]
    assert all(10 * 2**20 < rss[s] <= peak[s] for s in rss), (rss, peak)


@pytest.mark.parametrize("flags,message", [
    (["--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval must be 0"),
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "5"], "need 0 <= start < end, got 5 and 5"),
    (["--profile", "--use-pytorch-profiler"], "--use-pytorch-profiler writes its traces to --tensorboard-dir"),
    (["--tensorboard-queue-size", "0"], "--tensorboard-queue-size must be positive"),
    # Megatron-LM profiles no rank then, silently (found by breakit2: a one-process run with --profile-ranks 5)
    (["--profile", "--profile-ranks", "5"], "--profile-ranks 5 names no rank of this run (ranks 0 to 0)"),
])
def test_bad_values_are_one_line(flags, message):
    ((error,),) = [run_distributed(_error_of, 1, TINY + flags, timeout=60)]
    assert error is not None and message in error and "\n" not in error


def test_nsight_profiling_without_cuda_says_so_and_trains(capfd):
    result = _logged(run_distributed(_train, 1, TINY + ["--train-iters", "3", "--eval-iters", "0", "--profile",
                                                        "--profile-step-start", "1"], timeout=120))
    assert result.iteration == 3
    out = capfd.readouterr().out
    assert out.count("> --profile without --use-pytorch-profiler marks an Nsight Systems capture range") == 1


@pytest.mark.parametrize("flags,warning", [
    (["--manual-gc-interval", "2", "--profile-ranks", "1"],
     "warning: --manual-gc-interval, --profile-ranks: no effect without --manual-gc and --profile; add "),
    (["--profile", "--profile-step-start", "3"],
     "warning: --profile-step-start 3 is not below --train-iters 3: nothing is profiled"),
    # Megatron-LM's training loop saves when `args.save and args.save_interval`: a script with its --save line
    # taken out trains without saving. It stopped with '--save-interval needs --save DIR'.
    (["--save-interval", "2"], "warning: --save-interval: no effect without --save DIR; add --save DIR or drop "
                               "--save-interval"),
])
def test_options_that_cannot_take_effect_say_so_in_one_line(capfd, flags, warning):
    """Megatron-LM ignores them silently (found by breakit2: --profile's default window 10-12 in a shorter run
    records nothing); the run still trains, so a script that toggles only the switch keeps working."""
    result = _logged(run_distributed(_train, 1, TINY + ["--train-iters", "3", "--eval-iters", "0"] + flags,
                                     timeout=120))
    assert result.iteration == 3
    err = capfd.readouterr().err
    assert err.count(warning) == 1, err


PER_TOKEN = ["--eod-mask-loss", "--train-iters", "8", "--eval-iters", "0", "--log-interval", "1"]


def test_per_token_loss_is_the_global_batch_token_mean_under_any_split_and_layout():
    """With --eod-mask-loss the microbatches hold different numbers of loss tokens. The per-token objective
    (sum over the global batch / its token count) does not depend on how the batch is cut: micro batch 2 x
    4 microbatches, one microbatch of 8, DP 2 and PP 2 all train alike; the default mean of microbatch means
    does depend on it."""
    whole = _logged(run_distributed(_train, 1, TINY + PER_TOKEN + ["--micro-batch-size", "8"], timeout=120))
    per_token = _logged(run_distributed(_train, 1, TINY + PER_TOKEN + ["--calculate-per-token-loss"], timeout=120))
    default = _logged(run_distributed(_train, 1, TINY + PER_TOKEN, timeout=120))
    for i, (got, want) in enumerate(zip(per_token.losses, whole.losses, strict=True), start=1):
        assert abs(got - want) <= 1e-5 * abs(want), f"iteration {i}: {got} vs one microbatch {want}"
    # the masks differ: 3.1e-5 relative at iteration 8, against 2e-8 with the per-token loss
    assert abs(default.losses[-1] - whole.losses[-1]) > 1e-5 * abs(whole.losses[-1])
    for world, layout in [(2, ["--use-distributed-optimizer"]), (2, ["--pipeline-model-parallel-size", "2"])]:
        got = _logged(run_distributed(_train, world, TINY + PER_TOKEN + ["--calculate-per-token-loss"] + layout,
                                      timeout=180))
        for i, (a, b) in enumerate(zip(got.losses, whole.losses, strict=True), start=1):
            assert abs(a - b) <= 1e-5 * abs(b), f"{layout} iteration {i}: {a} vs one microbatch {b}"


def test_grad_reduce_in_bf16_keeps_bf16_gradient_buffers():
    from megatron_core.training.arguments import config_from_args, parse_args
    from megatron_core.training.arguments.validate import validate_args

    def ddp(extra):
        return config_from_args(validate_args(parse_args(TINY + ["--bf16"] + extra), world_size=2)).ddp

    assert ddp([]).grad_reduce_in_fp32 and not ddp(["--grad-reduce-in-bf16"]).grad_reduce_in_fp32
    argv = TINY + ["--bf16", "--train-iters", "6", "--eval-iters", "0", "--log-interval", "1"]
    fp32 = _logged(run_distributed(_train, 2, argv, timeout=180)).losses
    bf16 = _logged(run_distributed(_train, 2, argv + ["--grad-reduce-in-bf16"], timeout=180)).losses
    assert bf16 != fp32 and all(abs(a - b) <= 1e-2 * abs(b) for a, b in zip(bf16, fp32, strict=True))


@pytest.mark.parametrize("flags,message", [
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 reduces the gradients of --bf16 training; add --bf16"),
    (["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"], "contradict each other"),
])
def test_grad_reduce_in_bf16_needs_bf16(flags, message):
    error = run_distributed(_error_of, 1, TINY + flags, timeout=60)[0]
    assert error is not None and message in error and "\n" not in error


def _train_and_peak(argv):
    import pretrain_gpt
    from megatron_core import device
    pretrain_gpt.main(argv)
    return device.memory_report_mib()["max rss"]


def test_memory_report_after_the_first_line_on_every_dp_rank_0(capfd):
    """Megatron-LM's ``report_memory``: once, after the first progress line, every DP rank 0 prints
    ``[Rank r] (after N iterations) memory (MB) | ...``; on the CPU the process's resident memory (rss, max rss:
    VmRSS, VmHWM), whose peak is at most the one the rank reads after its run."""
    argv = TINY + ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "2",
                   "--tensor-model-parallel-size", "2"]
    peaks = run_distributed(_train_and_peak, 4, argv, timeout=180)  # TP 2 x DP 2: global ranks 0, 1 are DP rank 0
    out = capfd.readouterr().out
    found = re.findall(r"^\[Rank (\d)\] \(after (\d+) iterations\) memory \(MB\) \| rss: ([\d.]+) \| "
                       r"max rss: ([\d.]+)$", out, flags=re.MULTILINE)
    assert sorted(int(rank) for rank, *_ in found) == [0, 1], out[-2000:]
    for rank, after, rss, max_rss in found:
        assert after == "2" and 0 < float(rss) <= float(max_rss) <= peaks[int(rank)], (rank, rss, max_rss, peaks)
    assert out.index("iteration        2/") < out.index("[Rank 0] (after 2 iterations)")
