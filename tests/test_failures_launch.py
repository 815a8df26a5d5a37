"""Issue #14, distributed faults: a killed pipeline rank (10), a killed launcher (11), multi-node launch (16)."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from harness import RankError, run_distributed
from test_pipeline_schedules import MICRO_BATCH, SEQ, _build, _config, forward_step, microbatches

from megatron_core import parallel_state
from megatron_core.pipeline_parallel import get_forward_backward_func

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage_killed(report_dir: str):
    ps = parallel_state.initialize_model_parallel(1, 3)
    (chunk,) = _build(_config(num_layers=3), ps)
    calls = []

    def dying_forward_step(data_iterator, model):
        calls.append(1)
        if ps.pp_rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no Python error: the process is simply gone
        return forward_step(data_iterator, model)

    try:
        get_forward_backward_func(ps)(
            forward_step_func=dying_forward_step, data_iterator=iter(microbatches(0, 4)),
            model=[chunk], num_microbatches=4, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    except Exception as exc:
        with open(os.path.join(report_dir, f"rank{dist.get_rank()}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise


def test_a_killed_pipeline_rank_is_reported_as_a_lost_peer_not_as_a_survivor(tmp_path):
    with pytest.raises(RankError):
        run_distributed(_stage_killed, 3, str(tmp_path), timeout=60)
    for rank in (0, 2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith("PipelineStageError: a peer was lost: "), text[:300]
        assert "raised" not in text.split(";")[0], text[:300]


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path, needle, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in open(path).read():
            return
        assert proc.poll() is None, open(path).read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"never saw {needle!r}:\n{open(path).read()[-3000:]}")


@contextlib.contextmanager
def _two_plain_ranks(tmp_path, argv, **env_extra):
    """pretrain_gpt.py with ``argv`` as ranks 0 and 1 of a 2-process world, started without torchrun (each
    writes to ``tmp_path/rank{r}.txt``); yields (processes, log paths) and kills both and their children after."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", **env_extra)
    logs = [str(tmp_path / f"rank{r}.txt") for r in range(2)]
    ranks = []
    try:
        for r, log in enumerate(logs):
            with open(log, "w") as out:
                ranks.append(subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *argv],
                                              cwd=str(tmp_path), env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                              stdout=out, stderr=subprocess.STDOUT))
        yield ranks, logs
    finally:
        for proc in ranks:
            for pid in _children(proc.pid) + [proc.pid]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def test_workers_stop_when_their_launcher_is_killed(tmp_path):
    from test_failures_training import TINY

    ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "log.txt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    with open(log, "w") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
             "--master_port", str(_free_port()), os.path.join(REPO, "pretrain_gpt.py"), *TINY, "--train-iters",
             "100000", "--save", ckpt, "--save-interval", "3"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    workers = []
    try:
        _wait_for(log, "successfully saved checkpoint at iteration       3", agent)
        workers += _children(agent.pid)
        assert workers, "torchrun started no worker"
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), f"workers {workers} still run after their launcher was killed"
        saved = sorted(os.listdir(ckpt))
        time.sleep(1.5)
        assert sorted(os.listdir(ckpt)) == saved  # and nothing is written afterwards
    finally:
        for pid in workers + _children(agent.pid) + [agent.pid]:  # never leave an orphan training
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_two_torchrun_agents_on_localhost_reproduce_the_one_process_losses(tmp_path):
    """Two "nodes" (torchrun agents with --nnodes 2 and a c10d rendezvous) x 2 processes: TP 2 x DP 2."""
    import re

    from test_failures_training import TINY, _one

    argv = TINY + ["--vocab-size", "255", "--global-batch-size", "4", "--train-iters", "3", "--eval-iters", "0"]
    serial = _one(argv)  # 256 tokens pad to 256 at TP 1 and TP 2 alike: the same model
    env = dict(os.environ, NNODES="2", NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}",
               RDZV_ID="test-multinode", PYTHON=sys.executable, PYTHONPATH=REPO, GLOO_SOCKET_IFNAME="lo")
    logs = [str(tmp_path / f"node{i}.txt") for i in range(2)]
    agents = []
    for log in logs:
        with open(log, "w") as out:
            agents.append(subprocess.Popen(
                ["bash", os.path.join(REPO, "scripts", "pretrain_gpt_multinode.sh"), *argv,
                 "--tensor-model-parallel-size", "2"], cwd=str(tmp_path), env=env, stdout=out,
                stderr=subprocess.STDOUT))
    try:
        codes = [agent.wait(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    text = "".join(open(log).read() for log in logs)
    assert codes == [0, 0], text[-4000:]
    assert "world size 4: tensor parallel 2, pipeline parallel 1, data parallel 2" in text
    losses = [float(v) for v in re.findall(r"iteration +\d+/ +3 \|.*?lm loss: ([0-9.E+-]+)", text)]
    assert losses == pytest.approx(serial.losses, rel=1e-5), (losses, serial.losses)


def test_a_config_error_under_torchrun_is_its_root_cause(tmp_path):
    """A misspelt flag under torchrun: our one line once, and the same line as the root cause of torchrun's
    failure report (its error file), where a user reads first, instead of "To enable traceback see"."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), os.path.join(REPO, "pretrain_gpt.py"), "--demo", "--trian-iters", "3"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    ours = "error: unrecognized arguments: --trian-iters 3; did you mean: --trian-iters -> --train-iters?"
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"{ours} (see python pretrain_gpt.py --help)"], proc.stderr
    root_cause = proc.stderr.split("Root Cause (first observed failure):", 1)[-1]
    assert f"traceback : {ours}" in root_cause, proc.stderr[-3000:]


@pytest.mark.parametrize("during", [["--eval-iters", "0"], ["--eval-interval", "3", "--eval-iters", "100000"]],
                         ids=["training", "evaluation"])
def test_a_rank_whose_peer_is_killed_exits_with_dataloader_workers(tmp_path, during):
    """kill -9 of one rank (two plain processes, no torchrun, --num-workers 2, Megatron-LM's default): the
    other rank fails on the lost peer and its process ends. Its DataLoader workers ignore SIGTERM (so a
    group-wide SIGTERM still saves), so multiprocessing's exit handler, which stops them with SIGTERM and
    joins, waited forever while the failed iterator was still referenced (under torchrun: its SIGKILL after 30 s).
    Killed during training or during an evaluation (which has its own validation iterators)."""
    from test_failures_training import TINY

    argv = TINY + ["--train-iters", "100000", "--num-workers", "2",
                   "--tensor-model-parallel-size", "2", "--vocab-size", "255"] + during
    with _two_plain_ranks(tmp_path, argv) as (ranks, logs):
        _wait_for(logs[0], "iteration        3/", ranks[0])
        ranks[1].send_signal(signal.SIGKILL)
        ranks[0].wait(timeout=20)  # subprocess.TimeoutExpired: rank 0 hangs at exit
        assert ranks[0].returncode == 1
        text = open(logs[0]).read()
        # One line, not a traceback of ours on every surviving rank (the cause is another rank's death)
        assert [line for line in text.splitlines() if "a peer was lost" in line] == [
            line for line in text.splitlines() if line.startswith("error: a peer was lost")], text[-3000:]
        assert "error: a peer was lost" in text and "Traceback" not in text, text[-3000:]


def test_a_peer_killed_during_a_save_is_reported_as_a_lost_peer(tmp_path):
    """kill -9 of rank 1 while a torch_dist save waits to publish: rank 0 said only gloo's "RuntimeError: ...
    Connection reset by peer" from the save's agreement, not that a peer was lost (as training does)."""
    from test_failures_training import TINY

    from megatron_core.dist_checkpointing.serialization import PAUSE_BEFORE_PUBLISH_ENV

    ckpt = tmp_path / "ckpt"
    argv = TINY + ["--train-iters", "100000", "--eval-iters", "0", "--tensor-model-parallel-size", "2",
                   "--vocab-size", "255", "--save", str(ckpt), "--save-interval", "2"]
    with _two_plain_ranks(tmp_path, argv, **{PAUSE_BEFORE_PUBLISH_ENV: "3"}) as (ranks, logs):
        written = ckpt / "iter_0000002.tmp" / "common.pt"  # rank 0 writes it last, then every rank pauses
        deadline = time.monotonic() + 120
        while not written.exists() and time.monotonic() < deadline:
            assert ranks[0].poll() is None, open(logs[0]).read()[-3000:]
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGKILL)
        ranks[0].wait(timeout=60)
        text = open(logs[0]).read()
        assert ranks[0].returncode != 0
        assert "error: a peer was lost while saving iteration 2 to " in text, text[-3000:]


def _killed_after_the_schedule(report_dir: str, where: str):
    """pretrain_gpt.main at DP 2 where rank 1 dies (SIGKILL) on its second call of ``where``, just before a
    collective outside the pipeline schedule: train_step's loss all-reduce, or the per-iteration exit check's."""
    from test_failures_training import TINY

    import pretrain_gpt
    from megatron_core.training import training_loop
    from megatron_core.training.signal_handler import ExitSignalHandler

    owner = {"reduce_loss_dicts": training_loop, "signal_received_any": ExitSignalHandler}[where]
    real, calls = getattr(owner, where), []

    def dying(*args):
        calls.append(1)
        if dist.get_rank() == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    setattr(owner, where, dying)  # in this forked rank only
    try:
        pretrain_gpt.main(TINY + ["--train-iters", "5", "--eval-iters", "0", "--global-batch-size", "4"])
    except Exception as exc:
        with open(os.path.join(report_dir, f"rank{dist.get_rank()}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise


@pytest.mark.parametrize("where,activity", [("reduce_loss_dicts", "training iteration 2"),
                                            ("signal_received_any", "training, after iteration 2")])
def test_a_peer_killed_outside_the_schedule_is_reported_as_a_lost_peer(tmp_path, where, activity):
    """Collectives of a training iteration outside the pipeline schedule (train_step's loss all-reduce and
    optimizer, the exit check) met a dead peer with gloo's bare RuntimeError; inside the schedule the same death
    was already 'a peer was lost'."""
    with pytest.raises(RankError):
        run_distributed(_killed_after_the_schedule, 2, str(tmp_path), where, timeout=120)
    text = (tmp_path / "rank0.txt").read_text()
    assert text.startswith(f"PipelineStageError: a peer was lost while {activity}: global rank 0 "), text
