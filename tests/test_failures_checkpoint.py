"""Issue #14, damaged or mis-pointed checkpoint files: one line naming the file and the fix, never a traceback.

Items 2 (``--load`` at the wrong path), 6 (truncated files), 7 (deleted shard, bad tracker, pickles),
8 (``--save`` location, full disk, leftovers) and 12 (a second SIGTERM).
"""
import contextlib
import os
import pickle
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from harness import run_distributed
from test_failures_training import LEGACY, TINY, _run, _without

from megatron_core.training import checkpoint_io as io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO = ["--use-distributed-optimizer", "--global-batch-size", "4"]  # 2 DP ranks, one microbatch each


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A legacy ZeRO checkpoint of 2 DP ranks at iterations 1 and 2 (copied per test before damaging it)."""
    ckpt = str(tmp_path_factory.mktemp("saved") / "ckpt")
    results = run_distributed(_run, 2, TINY + LEGACY + ZERO + ["--save", ckpt, "--save-interval", "1"], timeout=120)
    assert not any(isinstance(r, str) for r in results), results
    return ckpt


def _copy(saved, tmp_path):
    import shutil

    target = str(tmp_path / "ckpt")
    shutil.copytree(saved, target)
    return target


def _messages(argv, world=2):
    return run_distributed(_run, world, TINY + ZERO + argv, timeout=120)


def _one_line_error(messages, *needles):
    for message in messages:
        assert isinstance(message, str) and message.startswith("ConfigError: ") and "\n" not in message, message
        for needle in needles:
            assert needle in message, message
    return messages[0]


# ---- 2. --load at the wrong path ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["iteration directory", "tracker file", "model file", "other directory"])
def test_load_at_the_wrong_path_is_an_error_not_a_fresh_start(saved, tmp_path, where):
    ckpt = _copy(saved, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("notes.txt", "a.txt", "b.txt"):  # three entries: all named, no ", ..."
        (other / name).write_text("not a checkpoint")
    path = {"iteration directory": io.iteration_dir(ckpt, 2),
            "tracker file": os.path.join(ckpt, io.TRACKER_FILENAME),
            "model file": os.path.join(io.iteration_dir(ckpt, 2), "mp_rank_00", io.MODEL_FILENAME),
            "other directory": str(other)}[where]
    # An iteration's directory is named as such, with the parent to pass instead.
    hint = {"iteration directory": f"is one iteration's directory; expected a checkpoint directory holding "
                                   f"{io.TRACKER_FILENAME} and iter_NNNNNNN/: pass --load {os.path.normpath(ckpt)} "
                                   f"(add --ckpt-step 2 for this iteration)",
            "other directory": "holds a.txt, b.txt, notes.txt but no checkpoint; expected a checkpoint directory"
            }.get(where, "expected a checkpoint directory")
    _one_line_error(_messages(["--load", path], world=1), f"--load {path}", hint)


def _engine_checkpoint(directory):
    import megatron_core
    model = torch.nn.Linear(4, 4)
    engine, _, _, _ = megatron_core.initialize(model, config={"train_batch_size": 1, "optimizer": {
        "type": "SGD", "params": {"lr": 0.1}}}, dist_init_required=False)
    engine.save_checkpoint(directory)
    engine.parallel_state.destroy()


def test_load_at_a_hugging_face_folder_or_an_engine_checkpoint_names_the_conversion(saved, tmp_path):
    """Both ended at 'holds config.json, ... but no checkpoint' (pretrain_gpt.py) and, from
    run_text_generation.py, at the converter's 'use --loader hf' (a flag that tool does not have)."""
    from megatron_core.errors import ConfigError
    from megatron_core.inference.loading import read_full_model
    from tests.hf_testing import tiny_hf_gpt2
    hf, engine = str(tmp_path / "hf"), str(tmp_path / "engine")
    tiny_hf_gpt2().save_pretrained(hf)
    run_distributed(_engine_checkpoint, 1, engine, timeout=60)
    convert = "tools/checkpoint/convert.py --model-type GPT --loader hf --saver core --load-dir"
    _one_line_error(_messages(["--load", hf], world=1),
                    f"; it is a Hugging Face model folder: convert it with {convert} {hf} --save-dir CKPT and load "
                    f"CKPT")
    engine_hint = (f"; it is a megatron_core.initialize (engine) checkpoint: for a transformers model write a Hugging "
                   f"Face folder with tools/zero_to_fp32.py {engine} HF_DIR, then {convert} HF_DIR --save-dir CKPT")
    _one_line_error(_messages(["--load", engine], world=1), engine_hint)
    with pytest.raises(ConfigError) as error:
        read_full_model(engine)
    assert str(error.value) == (f"--load {engine} is neither a Hugging Face folder (no config.json) nor a training "
                                f"checkpoint (no {io.TRACKER_FILENAME}){engine_hint}")
    with pytest.raises(ConfigError, match=f"it is one iteration's directory: pass --load {saved} --load-iteration 2$"):
        read_full_model(io.iteration_dir(saved, 2))
    # The engine's tag folder (global_stepN, holding mp_rank_00_model_states.pt) was taken for an iteration
    # directory of a training checkpoint: "pass --load ENGINE (add --ckpt-step N ...)", which cannot load either.
    tag = open(os.path.join(engine, "latest")).read().strip()
    folder = os.path.join(engine, tag)
    tag_hint = (f"; it is a tag folder of a megatron_core.initialize (engine) checkpoint: for a transformers model "
                f"write a Hugging Face folder with tools/zero_to_fp32.py {engine} HF_DIR -t {tag}, then {convert} "
                f"HF_DIR --save-dir CKPT")
    _one_line_error(_messages(["--load", folder], world=1), tag_hint)
    with pytest.raises(ConfigError) as error:
        read_full_model(folder)
    assert str(error.value).endswith(tag_hint)


def test_load_from_a_missing_or_empty_directory_starts_fresh(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        results = _messages(["--load", str(path)], world=1)
        assert any(not isinstance(r, str) and r is not None and r.loaded_iteration == 0 for r in results), results


# ---- 6. truncated or empty files ---------------------------------------------------------------------
@pytest.mark.parametrize("victim,damage", [(io.MODEL_FILENAME, "truncated"), ("distrib_optim_dp001.pt", "empty")])
def test_a_damaged_file_is_named_with_the_previous_iteration(saved, tmp_path, capfd, victim, damage):
    ckpt = _copy(saved, tmp_path)
    path = os.path.join(io.iteration_dir(ckpt, 2), "mp_rank_00", victim)
    size = os.path.getsize(path)
    left = size // 2 if damage == "truncated" else 0
    with open(path, "r+b") as f:
        f.truncate(left)
    capfd.readouterr()
    # The manifest's sizes tell the damage before any file is unpickled.
    _one_line_error(_messages(["--load", ckpt]), f"checkpoint file {path}",
                    f"has {left} bytes, the save wrote {size}", "--ckpt-step 1")
    assert "loaded checkpoint" not in capfd.readouterr().out  # no rank says "loaded" before the error


def test_a_damaged_file_without_manifest_is_still_one_line(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    os.remove(os.path.join(io.iteration_dir(ckpt, 2), io.MANIFEST_FILENAME))  # a checkpoint of an older save
    path = os.path.join(io.iteration_dir(ckpt, 2), "mp_rank_00", "distrib_optim_dp000.pt")
    open(path, "wb").close()
    _one_line_error(_messages(["--load", ckpt]), path, "is truncated or damaged",
                    "--ckpt-step 1")


def test_bytes_overwritten_in_the_pickle_are_damage_not_a_pickled_object(saved, tmp_path):
    """Same size (the manifest passes), garbage inside the file's pickle: the load said the file 'is not a
    plain-tensor checkpoint: it holds pickled Python objects ... re-save it with tensors and plain values
    only' (torch's weights-only unpickler fails on the garbage opcode as on a class); it is damage."""
    ckpt = _copy(saved, tmp_path)
    path = os.path.join(io.iteration_dir(ckpt, 2), "mp_rank_00", "distrib_optim_dp001.pt")
    with open(path, "r+b") as f:
        f.seek(300)
        f.write(b"Z" * 200)
    message = _one_line_error(_messages(["--load", ckpt]), path, "is truncated or damaged (UnpicklingError: "
                              "Unsupported operand 90)", "--ckpt-step 1")
    assert "plain-tensor" not in message, message


# ---- 7. deleted shard, bad tracker, pickled objects ------------------------------------------------------
def test_a_deleted_dp_shard_is_named_not_called_a_dp_size_change(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    path = os.path.join(io.iteration_dir(ckpt, 2), "mp_rank_00", "distrib_optim_dp001.pt")
    os.remove(path)
    message = _one_line_error(_messages(["--load", ckpt]), path, "was deleted")
    assert "data-parallel size" not in message
    os.remove(os.path.join(io.iteration_dir(ckpt, 2), io.MANIFEST_FILENAME))
    _one_line_error(_messages(["--load", ckpt]), path, "is missing")


def test_random_bytes_in_the_tracker_name_the_file(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    tracker = os.path.join(ckpt, io.TRACKER_FILENAME)
    with open(tracker, "wb") as f:
        f.write(bytes(range(128, 256)))
    _one_line_error(_messages(["--load", ckpt]), tracker, "not an iteration number")


class _Payload:
    """Stands for any pickled class (a checkpoint written with torch.save of an object)."""


def test_a_pickled_object_is_refused_in_one_line(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    path = os.path.join(io.iteration_dir(ckpt, 2), "mp_rank_00", io.MODEL_FILENAME)
    state = io.load_file(path)
    state["extra"] = _Payload()
    torch.save(state, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    os.remove(os.path.join(io.iteration_dir(ckpt, 2), io.MANIFEST_FILENAME))
    _one_line_error(_messages(["--load", ckpt]), path, "is not a plain-tensor checkpoint")


# ---- 8. the save location ------------------------------------------------------------------------------
def test_an_unusable_save_location_fails_at_start_up(tmp_path, capfd):
    existing = tmp_path / "a_file"
    existing.write_text("x")
    for path, needle in ((existing, "is an existing file"), (existing / "sub", "is not writable")):
        capfd.readouterr()
        message = run_distributed(_run, 1, TINY + ["--save", str(path)], timeout=60)[0]
        assert isinstance(message, str) and f"--save {path} " in message and needle in message, message
        assert "iteration        1/" not in capfd.readouterr().out  # refused before training


def _run_with_small_file_limit(argv, limit):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return _run(argv)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_a_failed_write_is_one_line_and_leaves_no_partial_directory(tmp_path, fmt):
    ckpt = tmp_path / "ckpt"
    message = run_distributed(_run_with_small_file_limit, 1, TINY + ["--save", str(ckpt), "--ckpt-format", fmt],
                              20_000, timeout=60)[0]
    assert isinstance(message, str) and message.startswith("ConfigError: saving iteration 2 to ") and \
        "\n" not in message and "the partial directory was removed" in message, message
    # The cause, not DCP's "CheckpointException ranks:dict_keys([0])" nor torch.save's "unexpected pos N vs M"
    assert "File too large" in message, message
    assert os.listdir(ckpt) == []


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_leftovers_of_killed_saves_are_removed_at_the_next_save(tmp_path, fmt):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000005.tmp" / "mp_rank_00").mkdir(parents=True)
    (ckpt / f"{io.TRACKER_FILENAME}.tmp.12345").write_text("5")
    run_distributed(_run, 1, TINY + ["--save", str(ckpt), "--ckpt-format", fmt], timeout=60)
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", io.TRACKER_FILENAME]


# ---- 12. signals to a running pretrain_gpt.py ---------------------------------------------------------------
@contextlib.contextmanager
def _training_until(argv, iteration, new_session=False):
    """A real ``pretrain_gpt.py`` process, read until it logs ``iteration``: yields ``(proc, seen)`` (the
    lines read so far). The process (its group with ``new_session``) is killed on the way out if still
    running, so a failing test leaves no training behind."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if f"iteration {iteration:>8}/" in line:
                break
        yield proc, seen
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                (os.killpg if new_session else os.kill)(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()


def test_a_second_sigterm_after_the_save_still_exits_cleanly(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    argv = TINY + ["--save", ckpt, "--train-iters", "100000", "--eval-iters", "0"]
    with _training_until(argv, 3) as (proc, seen):
        proc.send_signal(signal.SIGTERM)
        for line in proc.stdout:
            seen.append(line)
            if "successfully saved checkpoint" in line:
                break
        while proc.poll() is None:  # the scheduler repeats its notice until the process is gone
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.005)
        out = "".join(seen) + proc.stdout.read()
    assert proc.returncode == 0, out[-2000:]
    assert "successfully saved checkpoint" in out


def test_the_exit_signal_handler_gives_back_the_handler_it_found():
    """ExitSignalHandler (--exit-signal-handler) restores the caller's own handler when it is released (here
    as a ``with`` block), and after a received signal ignores the next one instead (a scheduler's repeat)."""
    from megatron_core.training.signal_handler import ExitSignalHandler

    calls = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    own = signal.getsignal(signal.SIGUSR1)
    try:
        with ExitSignalHandler(signal.SIGUSR1) as handler:
            pass
        assert signal.getsignal(signal.SIGUSR1) is own and not handler.received
        signal.raise_signal(signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]
        with ExitSignalHandler(signal.SIGUSR1) as handler:
            signal.raise_signal(signal.SIGUSR1)
        assert handler.received and calls == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        signal.raise_signal(signal.SIGUSR1)  # ignored: neither handler runs, the process goes on
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


def _run_interrupted_mid_write(argv, limit):
    """Ctrl-C arriving while the checkpoint files are written: the write past ``limit`` bytes raises
    KeyboardInterrupt where it stands, as SIGINT's default handler does."""
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def ctrl_c(signum, frame):
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # once; the disk is not full, writes go on
        raise KeyboardInterrupt

    signal.signal(signal.SIGXFSZ, ctrl_c)
    os.environ["MCORE_SHM_COLLECTIVES"] = "0"  # its /dev/shm file would pass the limit before the save
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    return _run(argv)


@pytest.mark.parametrize("world", [1, 2])  # one process: the KeyboardInterrupt itself; two: inside DCP's error
def test_ctrl_c_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, world):
    ckpt = tmp_path / "ckpt"
    argv = TINY + ["--save", str(ckpt), "--global-batch-size", str(2 * world)]
    run_distributed(_run, world, argv + ["--exit-interval", "1"], timeout=60)
    messages = run_distributed(_run_interrupted_mid_write, world, argv + ["--load", str(ckpt)], 20_000, timeout=60)
    assert len(set(messages)) == 1, messages
    message = messages[0]
    assert isinstance(message, str) and "\n" not in message, message
    assert message == (f"ConfigError: saving iteration 2 to {ckpt} was interrupted (Ctrl-C); the partial directory "
                       f"was removed and the previous checkpoint is still the latest"), message
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", io.TRACKER_FILENAME]
    assert io.read_tracker(str(ckpt)) == 1


def test_ctrl_c_during_training_is_one_line_not_a_traceback(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    argv = TINY + ["--save", ckpt, "--save-interval", "2", "--train-iters", "100000", "--eval-iters", "0"]
    with _training_until(argv, 5) as (proc, seen):
        proc.send_signal(signal.SIGINT)
        out = "".join(seen) + proc.stdout.read()
        proc.wait(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: interrupted (Ctrl-C)"), out[-3000:]
    # Saved at 2 and 4 before the signal; the latest named is complete (a save cut short leaves only a .tmp).
    assert io.read_tracker(ckpt) >= 4 and os.path.isfile(os.path.join(io.iteration_dir(ckpt, io.read_tracker(ckpt)),
                                                                       io.MANIFEST_FILENAME))


def test_sigterm_to_the_process_group_with_loader_workers_still_saves(tmp_path):
    """Slurm and torchrun signal the whole process group, DataLoader workers included (--num-workers 2,
    Megatron-LM's default): the run must still finish its iteration, save and exit 0."""
    ckpt = str(tmp_path / "ckpt")
    argv = _without(TINY, "--num-workers") + ["--num-workers", "2", "--save", ckpt, "--train-iters", "100000",
                                              "--eval-iters", "0"]
    with _training_until(argv, 3, new_session=True) as (proc, seen):
        os.killpg(proc.pid, signal.SIGTERM)
        out = "".join(seen) + proc.stdout.read()
        proc.wait(timeout=60)
    assert proc.returncode == 0 and "successfully saved checkpoint" in out, out[-3000:]
    assert "DataLoader worker" not in out and "Traceback" not in out, out[-3000:]
    assert io.read_tracker(ckpt) >= 3
