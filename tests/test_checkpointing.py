"""Checkpoints: resume equals an uninterrupted run, crash safety, SIGTERM, shape checks, finetune."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from harness import ProcessOutput, run_distributed

import pretrain_gpt
from megatron_core.training import checkpoint_io as io
from megatron_core.training.checkpointing import SLEEP_IN_SAVE_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dropout on and a warmup + cosine schedule, so a resume must restore RNG and scheduler state too.
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "12", "--lr", "3e-3",
        "--lr-warmup-iters", "3", "--lr-decay-style", "cosine", "--min-lr", "3e-4", "--mock-data",
        "--vocab-size", "255", "--log-interval", "4", "--eval-interval", "100", "--eval-iters", "1",
        "--num-workers", "0", "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--seed", "11",
        "--ckpt-format", "torch"]  # Megatron-LM's legacy per-rank files (torch_dist: test_pretrain_dist_ckpt.py)


def _train(argv):
    result = pretrain_gpt.main(argv)
    return result if result.is_logging_rank else None


def _logged(results):
    return [r for r in results if r is not None][0]


@pytest.mark.parametrize("zero", [["--use-distributed-optimizer"], ["--zero-stage", "3"],
                                  ["--zero-stage", "3", "--offload-param", "--ddp-bucket-size", "4000"]],
                         ids=["zero1", "zero3", "zero3-offload-param-buckets"])
def test_resume_equals_uninterrupted_run_under_zero(tmp_path, zero):
    """The legacy files under ZeRO-1 and ZeRO-3 (whose load copies each rank's shard from the model file)."""
    full = _logged(run_distributed(_train, 2, TINY + zero, timeout=120))
    ckpt = str(tmp_path / "ckpt")
    first = _logged(run_distributed(_train, 2, TINY + zero + ["--save", ckpt, "--exit-interval", "6"], timeout=120))
    assert first.exit_reason == "exit-interval" and first.saved_iterations == [6]
    assert first.losses == full.losses[:6]
    rank_dir = os.path.join(ckpt, "iter_0000006", "mp_rank_00")
    assert sorted(os.listdir(rank_dir)) == ["distrib_optim_dp000.pt", "distrib_optim_dp001.pt", "model_optim_rng.pt"]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "6"
    state = io.load_file(os.path.join(rank_dir, "model_optim_rng.pt"))
    assert state["iteration"] == 6 and state["consumed_train_samples"] == 48 and len(state["rng_state"]) == 2
    assert state["config"]["hidden_size"] == 32 and state["model_info"]["padded_vocab_size"] == 256
    resumed = _logged(run_distributed(_train, 2, TINY + zero + ["--load", ckpt], timeout=120))
    assert resumed.loaded_iteration == 6 and resumed.iteration == 12
    assert len(resumed.losses) == 6
    for i, (got, want) in enumerate(zip(resumed.losses, full.losses[6:], strict=True), start=7):
        assert abs(got - want) <= 1e-5 * abs(want), f"iteration {i}: resumed {got} vs uninterrupted {want}"


def test_resume_across_pipeline_stages(tmp_path):
    pp = ["--pipeline-model-parallel-size", "2"]
    full = _logged(run_distributed(_train, 2, TINY + pp, timeout=120))
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_train, 2, TINY + pp + ["--save", ckpt, "--save-interval", "5", "--exit-interval", "5"])
    assert sorted(os.listdir(os.path.join(ckpt, "iter_0000005"))) == ["manifest.json", "mp_rank_00_000",
                                                                      "mp_rank_00_001"]
    resumed = _logged(run_distributed(_train, 2, TINY + pp + ["--load", ckpt], timeout=120))
    assert resumed.losses == pytest.approx(full.losses[5:], rel=1e-5)


def _load_only(argv):
    try:
        result = pretrain_gpt.main(argv)
    except ValueError as exc:
        return f"{type(exc).__name__}: {exc}"
    return result


def test_other_model_shape_is_refused_naming_fields(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_train, 1, TINY + ["--save", ckpt, "--train-iters", "2"])
    wider = [a if a != "32" else "64" for a in TINY]  # hidden 64 (and seq 64)
    message = run_distributed(_load_only, 1, wider + ["--load", ckpt])[0]
    assert message.startswith("ConfigError: checkpoint") and "hidden_size: checkpoint 32 vs run 64" in message
    assert "ffn_hidden_size: checkpoint 128 vs run 256" in message
    # A shape mismatch points at --use-checkpoint-args; re-sharding only fixes a layout mismatch.
    assert "--use-checkpoint-args" in message and "convert.py" not in message
    message = run_distributed(_load_only, 1, TINY + ["--load", ckpt, "--ckpt-step", "7"])[0]
    assert message.startswith("ConfigError: --load") and "iterations saved there: 2;" in message


def test_distributed_optimizer_shards_at_another_dp_size_name_what_works(tmp_path):
    """It said "resume with the same number of ranks" (which number?); the message names it and Megatron-LM's
    --ckpt-convert-format (tested in test_pretrain_dist_ckpt.py), and its --no-load-optim resumes."""
    ckpt = str(tmp_path / "ckpt")
    zero1 = TINY + ["--use-distributed-optimizer", "--eval-iters", "0"]
    run_distributed(_train, 2, zero1 + ["--save", ckpt, "--train-iters", "2"], timeout=120)
    message = run_distributed(_load_only, 1, zero1 + ["--load", ckpt, "--train-iters", "3"], timeout=60)[0]
    assert message.startswith(f"ConfigError: {ckpt}/iter_0000002/mp_rank_00 holds 2 distributed-optimizer shards "
                              "(saved at data-parallel size 2) but this run's data-parallel size is 1; "), message
    assert "run these flags once with 2 processes and --ckpt-convert-format torch_dist --ckpt-convert-save DIR (as " \
           "Megatron-LM), then --load DIR/torch_dist at any data-parallel size with the optimizer; or resume with 2 " \
           "processes; or pass --no-load-optim" in message  # the conversion: test_pretrain_dist_ckpt.py
    resumed = _logged(run_distributed(_train, 1, zero1 + ["--load", ckpt, "--train-iters", "3", "--no-load-optim"],
                                      timeout=60))
    assert (resumed.loaded_iteration, resumed.iteration, resumed.consumed_train_samples) == (2, 3, 24)


def test_finetune_loads_weights_only_and_model_only_checkpoints_load(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = _logged(run_distributed(_train, 1, TINY + ["--save", ckpt, "--train-iters", "4", "--eval-interval", "4"]))
    # --finetune: the trained weights (same validation loss) from iteration 0 with a fresh optimizer.
    tuned = _logged(run_distributed(_train, 1, TINY + ["--load", ckpt, "--finetune", "--train-iters", "2",
                                                       "--eval-at-start"]))
    assert tuned.loaded_iteration == 0 and tuned.iteration == 2
    assert tuned.val_losses[0] == pytest.approx(saved.val_losses[4], rel=1e-6)
    # --no-load-optim --no-load-rng: the iteration and data position continue, the optimizer starts fresh.
    fresh = _logged(run_distributed(_train, 1, TINY + ["--load", ckpt, "--no-load-optim", "--no-load-rng",
                                                       "--train-iters", "5", "--eval-iters", "0"]))
    assert (fresh.loaded_iteration, fresh.iteration, fresh.consumed_train_samples) == (4, 5, 40)
    # A model-only checkpoint (as the HF converter writes): no optimizer, RNG or scheduler state.
    path = os.path.join(ckpt, "iter_0000004", "mp_rank_00", "model_optim_rng.pt")
    state = io.load_file(path)
    torch.save({k: state[k] for k in ("model", "config", "model_info")}, path)
    os.remove(os.path.join(ckpt, "iter_0000004", io.MANIFEST_FILENAME))  # a converter writes no manifest
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("release")
    os.rename(os.path.join(ckpt, "iter_0000004"), os.path.join(ckpt, "release"))
    plain = _logged(run_distributed(_train, 1, TINY + ["--load", ckpt, "--train-iters", "1", "--eval-at-start"]))
    assert plain.loaded_iteration == 0 and plain.val_losses[0] == pytest.approx(saved.val_losses[4], rel=1e-6)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_a_release_checkpoint_loads_as_weights_at_iteration_0(tmp_path, fmt):
    """Megatron-LM's load_checkpoint: a tracker saying 'release' means weights to start from ('if args.finetune or
    release: iteration = 0', and neither optimizer nor RNG is read), in either format. Here the saved iteration
    was taken: a release holding iteration 4 resumed at 4 with its optimizer and schedule (--train-iters 2 then
    stopped on the schedule check)."""
    ckpt = str(tmp_path / "ckpt")
    tiny = TINY + ["--ckpt-format", fmt]
    saved = _logged(run_distributed(_train, 1, tiny + ["--save", ckpt, "--train-iters", "4", "--eval-interval", "4"]))
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("release")
    os.rename(os.path.join(ckpt, "iter_0000004"), os.path.join(ckpt, "release"))
    tuned = _logged(run_distributed(_train, 1, tiny + ["--load", ckpt, "--train-iters", "2", "--eval-at-start"]))
    assert (tuned.loaded_iteration, tuned.iteration, tuned.consumed_train_samples) == (0, 2, 16)
    assert tuned.val_losses[0] == pytest.approx(saved.val_losses[4], rel=1e-6)


def test_a_part_left_out_by_no_save_flags_must_be_skipped_on_resume(tmp_path):
    """A resume of a --no-save-rng checkpoint went on with this run's own seeding, and one of a --no-save-optim
    checkpoint (here under the distributed optimizer) with a fresh optimizer, each without a word but a log line.
    Each stops now in one line naming the flag that skips the part, as Megatron-LM's legacy load; with that flag,
    or --finetune, it loads (the test of the model-only checkpoint above: a converter's records no save flags)."""
    no_rng, no_optim = str(tmp_path / "no_rng"), str(tmp_path / "no_optim")
    zero1 = TINY + ["--use-distributed-optimizer", "--eval-iters", "0"]
    run_distributed(_train, 1, TINY + ["--save", no_rng, "--exit-interval", "2", "--no-save-rng"])
    run_distributed(_train, 1, zero1 + ["--save", no_optim, "--exit-interval", "2", "--no-save-optim"])
    assert os.listdir(os.path.join(no_optim, "iter_0000002", "mp_rank_00")) == ["model_optim_rng.pt"]
    message = run_distributed(_load_only, 1, TINY + ["--load", no_rng, "--exit-interval", "3"])[0]
    assert message == (f"ConfigError: checkpoint {no_rng}/iter_0000002 was saved with --no-save-rng (it holds no RNG "
                       f"state) and this run would load it: pass --no-load-rng (or --finetune) to resume from its "
                       f"weights without it")
    message = run_distributed(_load_only, 1, zero1 + ["--load", no_optim, "--exit-interval", "3"])[0]
    assert message == (f"ConfigError: checkpoint {no_optim}/iter_0000002 was saved with --no-save-optim (it holds no "
                       f"optimizer state) and this run would load it: pass --no-load-optim (or --finetune) to resume "
                       f"from its weights without it")
    resumed = _logged(run_distributed(_train, 1, TINY + ["--load", no_rng, "--exit-interval", "3", "--no-load-rng"]))
    assert (resumed.loaded_iteration, resumed.iteration) == (2, 3)
    resumed = _logged(run_distributed(_train, 1, zero1 + ["--load", no_optim, "--exit-interval", "3",
                                                          "--no-load-optim"]))
    assert (resumed.loaded_iteration, resumed.iteration) == (2, 3)
    tuned = _logged(run_distributed(_train, 1, zero1 + ["--load", no_optim, "--exit-interval", "1", "--finetune"]))
    assert (tuned.loaded_iteration, tuned.iteration) == (0, 1)


@pytest.mark.parametrize("world,zero", [(2, ["--zero-stage", "3"]),
                                        (2, ["--zero-stage", "3", "--offload-param", "--bf16"]),
                                        (4, ["--zero-stage", "3", "--pipeline-model-parallel-size", "2"])],
                         ids=["zero3", "zero3-offload-param-bf16", "zero3-pp2-tied-embedding"])
def test_finetune_under_zero3_starts_from_the_saved_weights(tmp_path, world, zero):
    """--finetune reads the model file alone, so no optimizer state restores the shards after the model load (a
    resume's does): each rank's ZeRO-3 shards, copied from the model file, must be the saved weights (under PP
    the word embedding is tied to the last stage's output layer, a bucket of its own on each)."""
    zero = [*zero, "--ddp-bucket-size", "4000"]  # several buckets, parameters split across the two shards
    ckpt = str(tmp_path / "ckpt")
    saved = _logged(run_distributed(_train, world, TINY + zero + ["--save", ckpt, "--train-iters", "4",
                                                                  "--eval-interval", "4"], timeout=180))
    tuned = _logged(run_distributed(_train, world, TINY + zero + ["--load", ckpt, "--finetune", "--train-iters", "2",
                                                                  "--eval-at-start"], timeout=180))
    assert tuned.loaded_iteration == 0 and tuned.iteration == 2
    assert tuned.val_losses[0] == pytest.approx(saved.val_losses[4], rel=1e-6)


def _spawn(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_process_killed_while_saving_leaves_previous_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    proc = _spawn(TINY + ["--save", ckpt, "--save-interval", "4", "--train-iters", "8"],
                  {SLEEP_IN_SAVE_ENV: "8:60"})
    ProcessOutput(proc).until("[test hook]")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "4"
    assert os.path.isdir(os.path.join(ckpt, "iter_0000008.tmp"))
    assert not os.path.exists(os.path.join(ckpt, "iter_0000008"))
    resumed = _logged(run_distributed(_train, 1, TINY + ["--load", ckpt, "--train-iters", "8", "--exit-interval", "5"]))
    assert resumed.loaded_iteration == 4 and resumed.iteration == 5


def test_sigterm_saves_and_exits(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    proc = _spawn(TINY + ["--save", ckpt, "--train-iters", "100000", "--log-interval", "1"])
    output = ProcessOutput(proc)
    output.until("iteration        3/")
    proc.send_signal(signal.SIGTERM)
    out = output.rest(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    iteration = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    assert iteration >= 3 and f"exiting at iteration {iteration}: signal" in out
    assert os.path.isfile(os.path.join(ckpt, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt"))


def test_a_rank_missing_its_shard_fails_every_rank_promptly(tmp_path):
    pp = TINY + ["--pipeline-model-parallel-size", "2", "--train-iters", "1"]
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_train, 2, pp + ["--save", ckpt])
    os.remove(os.path.join(ckpt, "iter_0000001", "mp_rank_00_001", "model_optim_rng.pt"))
    messages = run_distributed(_load_only, 2, pp + ["--load", ckpt], timeout=60)  # no rank waits for a timeout
    # The manifest tells a deleted file from a checkpoint of another layout.
    assert all(m.startswith("ConfigError: ") and "mp_rank_00_001/model_optim_rng.pt was deleted" in m
               for m in messages)
    assert "(on rank 1)" in messages[0]


def test_complete_iterations_are_the_final_iteration_directories(tmp_path):
    # What a killed save leaves (iter_N.tmp, iter_N.old) and a stray file named like an iteration are
    # not checkpoints the "iterations saved there" hints may offer.
    for name in ("iter_0000010", "iter_0000002", "iter_0000004.tmp", "iter_0000006.old", "iter_latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "iter_0000008").write_text("not a directory")
    assert io.complete_iterations(str(tmp_path)) == [2, 10]


def test_first_line_of_a_dcp_failure_is_the_lowest_failing_ranks_own_error():
    # torch.distributed.checkpoint raises one CheckpointException whose str() holds every rank's
    # traceback; the one-line error names the lowest failing rank and that rank's exception.
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    disk_full, bad = OSError(28, "No space left on device"), ValueError("bad shard\nsecond line")
    exc = CheckpointException("save failed", {3: _wrap_exception(disk_full), 1: _wrap_exception(bad)})
    assert io.root_cause(exc) == (1, bad)
    assert io.first_line(exc) == "rank 1: ValueError: bad shard"
    plain = OSError(28, "No space left on device")
    assert io.root_cause(plain) == (None, plain)
    assert io.first_line(plain) == "[Errno 28] No space left on device"
    no_ranks = CheckpointException("save failed", {})
    assert io.root_cause(no_ranks) == (None, no_ranks)


def test_a_write_failure_without_an_os_error_says_how_much_space_is_left(tmp_path):
    """A torch_dist save onto a full tmpfs failed with only 'rank 0: RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos 704 vs 598' (torch's zip writer, through DCP, loses the
    ENOSPC): the line now adds the bytes free where --save is, as the legacy format's '[Errno 28] No space
    left on device' says it; an OS error keeps its own line."""
    import re
    import shutil

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    exc = CheckpointException("save failed", {0: _wrap_exception(short)})
    line = io.write_failure(exc, str(tmp_path))
    found = re.fullmatch(r"rank 0: RuntimeError: \[enforce fail at inline_container.cc:672\] \. unexpected pos 704 "
                         rf"vs 598; (\d+) bytes free on the file system of {re.escape(str(tmp_path))}", line)
    assert found, line
    assert abs(int(found.group(1)) - shutil.disk_usage(tmp_path).free) < 2**30
    assert io.write_failure(OSError(28, "No space left on device"), str(tmp_path)) == \
        "[Errno 28] No space left on device"


def test_rng_state_restores_every_stream_a_step_draws_from():
    # The checkpoint's rng_state: Python's, NumPy's global, torch's and the tracker's streams all draw
    # again what they drew after the state was taken (NumPy's only through its uint32 round trip).
    import random

    import numpy as np

    from megatron_core.rng_tracker import RNGStatesTracker
    from megatron_core.training.rng_state import get_rng_state, set_rng_state

    tracker = RNGStatesTracker()
    tracker.add("model-parallel-rng", 2729)

    def draws():
        with tracker.fork():
            forked = torch.rand(3)
        return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), forked.tolist()

    state = get_rng_state(tracker)
    first = draws()
    assert draws() != first
    set_rng_state(state, tracker)
    assert draws() == first
