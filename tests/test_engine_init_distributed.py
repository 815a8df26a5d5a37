"""``megatron_core.init_distributed`` (DeepSpeed's ``deepspeed.init_distributed``) in a script run as a
DeepSpeed user runs one: the group first (the model is built knowing its rank), then ``initialize``,
a few steps, and a clean exit under a real 2-rank ``torchrun``; and the launches it must refuse."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import megatron_core

    mode = sys.argv[1]
    if mode == "nccl":
        megatron_core.init_distributed(dist_backend="nccl")
    elif mode == "init-method-without-rank":
        megatron_core.init_distributed(init_method="tcp://127.0.0.1:1")
    elif mode == "group-only":  # a script that uses the group and builds no engine
        megatron_core.init_distributed()
        total = torch.ones(1)
        dist.all_reduce(total)
        print(f"sum {total.item():.0f}", flush=True)
        sys.exit(0)
    else:
        megatron_core.init_distributed()
        megatron_core.init_distributed()  # a second call is a no-op, as DeepSpeed's
    assert dist.is_initialized()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 2}}
    engine, _, _, _ = megatron_core.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = torch.randn(2, 8, generator=g)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    weights = [p.detach().clone() for p in engine.module.parameters()]
    gathered = [None] * world
    dist.all_gather_object(gathered, [w.sum().item() for w in weights])
    assert all(g == gathered[0] for g in gathered), gathered  # one model: DP kept the replicas equal
    print(f"rank {rank} of {world}: steps {engine.global_steps}", flush=True)
""")


def _run(tmp_path, *args, torchrun=True, extra_env=None):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(extra_env or {})}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*launch, str(script), *args], capture_output=True, text=True, timeout=240, env=env,
                          cwd=str(tmp_path))


def test_init_distributed_then_initialize_under_torchrun(tmp_path):
    proc = _run(tmp_path, "plain")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Two ranks print at once: lines may interleave.
    assert sorted(re.findall(r"rank \d of \d: steps \d", proc.stdout)) == [
        "rank 0 of 2: steps 3", "rank 1 of 2: steps 3"], proc.stdout
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]


def test_init_distributed_alone_tears_its_group_down_at_exit(tmp_path):
    """Without initialize, the exit handler init_distributed registers (no engine groups) destroys the default
    group, with no error of its own at exit."""
    proc = _run(tmp_path, "group-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("sum 2") == 2, proc.stdout
    for sign in ("Traceback", "Exception ignored", "terminate called"):
        assert sign not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("mode, env, message", [
    ("nccl", {}, "error: init_distributed: dist_backend='nccl' needs CUDA, which this machine lacks; drop "
                 "dist_backend (gloo is picked on CPU)"),
    ("init-method-without-rank", {}, "error: init_distributed: init_method='tcp://127.0.0.1:1' needs rank= and "
                                     "world_size= (got -1 and -1)"),
    ("plain", {"OMPI_COMM_WORLD_SIZE": "4"}, "error: 4 processes were started by mpirun (Open MPI) "
                                            "($OMPI_COMM_WORLD_SIZE=4) without torchrun's RANK, WORLD_SIZE"),
    ("plain", {"SLURM_STEP_NUM_TASKS": "2"}, "error: 2 processes were started by srun ($SLURM_STEP_NUM_TASKS=2)"),
], ids=["nccl-on-cpu", "init-method-without-rank", "mpirun", "srun"])
def test_launches_it_refuses_end_in_one_line(tmp_path, mode, env, message):
    proc = _run(tmp_path, mode, torchrun=False, extra_env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
