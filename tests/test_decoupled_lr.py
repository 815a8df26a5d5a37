"""--decoupled-lr / --decoupled-min-lr: the input embedding and output layer follow the schedule between
their own bounds (Megatron-LM's ``decoupled_lr`` param group), on every pipeline stage, through resumes.

The reference for the rates is Megatron-LM's formula (linear warmup from --lr-warmup-init, cosine decay
to the group's floor); for training, one process with the same flags.
"""
import math
import re

import pytest
import torch
from harness import run_distributed
from test_pretrain import TINY, _logged, _train

from megatron_core import parallel_state
from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron_core.models.gpt import build_gpt_model_chunks
from megatron_core.models.presets import gpt2_config
from megatron_core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron_core.training.errors import ConfigError
from megatron_core.training.lr_scheduler import OptimizerParamScheduler

LR, MIN_LR, DECOUPLED_LR, DECOUPLED_MIN_LR = 1e-3, 1e-4, 5e-3, 2e-4
WARMUP, DECAY, STEPS = 3, 12, 15
WORD, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


def _cosine(step, max_lr, min_lr):
    """Megatron-LM's rate: linear warmup from 0, cosine decay over (WARMUP, DECAY], then the floor."""
    if step <= WARMUP:
        return max_lr * step / WARMUP
    if step > DECAY:
        return min_lr
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (DECAY - WARMUP)))


def _groups_and_rates(tp, pp, tied, zero_stage, decoupled_min_lr):
    """This rank's groups by parameter name and every group's rate at steps 0..STEPS."""
    ps = parallel_state.ParallelState(tp, pp)
    config = gpt2_config(num_layers=pp * 2, hidden_size=32, num_attention_heads=4,
                         share_embeddings_and_output_weights=tied)
    chunks = build_gpt_model_chunks(config, 64, 16, ps, make_vocab_size_divisible_by=32)
    names = {id(p): n for chunk in chunks for n, p in chunk.named_parameters()}
    ddp = DistributedDataParallelConfig(zero_stage=zero_stage)
    model = [DistributedDataParallel(ddp, chunk, ps) for chunk in chunks]
    opt = OptimizerConfig(lr=LR, min_lr=MIN_LR, decoupled_lr=DECOUPLED_LR, decoupled_min_lr=decoupled_min_lr)
    optimizer = get_megatron_optimizer(opt, model, ps)
    scheduler = OptimizerParamScheduler(optimizer, 0.0, LR, MIN_LR, WARMUP, DECAY, "cosine", 0.01, 0.01, 0)
    main_to_name = {id(main): names[id(model_param)] for main, model_param in optimizer.pairs}
    groups = [sorted({main_to_name[id(p)] for p in g["params"]}) for g in optimizer.param_groups]
    rates = [[g["lr"] for g in optimizer.param_groups]]
    for _ in range(STEPS):
        scheduler.step(1)
        rates.append([g["lr"] for g in optimizer.param_groups])
    return {"first": ps.is_pipeline_first_stage(), "last": ps.is_pipeline_last_stage(), "groups": groups,
            "rates": rates, "decoupled": [bool(g.get("is_decoupled_lr")) for g in optimizer.param_groups]}


@pytest.mark.parametrize("tp,pp,tied,zero_stage,decoupled_min_lr", [
    (1, 1, True, 0, DECOUPLED_MIN_LR),
    (1, 3, False, 0, None),
    (2, 2, True, 1, DECOUPLED_MIN_LR),
], ids=["tied-one-stage", "pp3-untied", "tp2-pp2-tied-zero1"])
def test_embedding_and_output_groups_follow_the_decoupled_schedule_on_every_stage(tp, pp, tied, zero_stage,
                                                                                   decoupled_min_lr):
    ranks = run_distributed(_groups_and_rates, tp * pp, tp, pp, tied, zero_stage, decoupled_min_lr, timeout=120)
    floor = MIN_LR if decoupled_min_lr is None else decoupled_min_lr
    for rank, got in enumerate(ranks):
        # Megatron-LM tags the word embedding on the first stage and the output weight on the last; with
        # tied weights on one stage they are one Parameter, on separate stages the last holds a tied copy.
        expected = ([WORD] if got["first"] else []) + ([OUTPUT] if got["last"] and not (tied and pp == 1) else [])
        assert got["decoupled"] == [False, False, True], rank  # every rank has the group, empty in the middle
        assert got["groups"][2] == sorted(expected), (rank, got["groups"])
        assert not {WORD, OUTPUT} & set(got["groups"][0] + got["groups"][1]), (rank, got["groups"])
        assert got["groups"][0] and got["groups"][1]
        for step, (decay, no_decay, decoupled) in enumerate(got["rates"]):
            assert decay == pytest.approx(_cosine(step, LR, MIN_LR), rel=1e-12, abs=1e-15), (rank, step)
            assert no_decay == decay
            assert decoupled == pytest.approx(_cosine(step, DECOUPLED_LR, floor), rel=1e-12, abs=1e-15), (rank, step)
    assert any(r["groups"][2] == [] for r in ranks) == (pp == 3)


def _scheduler(decoupled_lr, **flags):
    w, e = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(4, 2))
    groups = [{"params": [w], "weight_decay": 0.1}]
    if decoupled_lr is not None:
        groups.append({"params": [e], "weight_decay": 0.1, "is_decoupled_lr": True, "max_lr": decoupled_lr,
                       "min_lr": 0.0})
    return OptimizerParamScheduler(torch.optim.AdamW(groups, lr=1.0), 0.0, LR, 0.0, WARMUP, DECAY, "cosine",
                                   0.1, 0.1, 0, **flags)


def test_resume_checks_the_decoupled_bounds_like_the_main_ones():
    saved = _scheduler(5e-3)
    saved.step(6)
    state = saved.state_dict()
    assert (state["decoupled_lr"], state["decoupled_min_lr"]) == (5e-3, 0.0)
    same = _scheduler(5e-3)
    same.load_state_dict(state)
    assert same.optimizer.param_groups[1]["lr"] == saved.optimizer.param_groups[1]["lr"]
    with pytest.raises(ConfigError, match=r"has decoupled_lr = 0\.005 but the flags give 0\.006; pass "
                                          r"--override-opt-param-scheduler"):
        _scheduler(6e-3).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"has decoupled_lr = 0\.005 but the flags give none \(no "
                                          r"--decoupled-lr\); pass"):
        _scheduler(None).load_state_dict(state)
    without = _scheduler(None)
    without.step(6)
    with pytest.raises(ConfigError, match=r"has decoupled_lr = none \(no --decoupled-lr\) but the flags give 0\.005"):
        _scheduler(5e-3).load_state_dict(without.state_dict())
    override = _scheduler(6e-3, override_opt_param_scheduler=True)
    override.optimizer.param_groups[1]["max_lr"] = 5e-3  # what the optimizer's load restores from the checkpoint
    override.load_state_dict(state)
    assert override.optimizer.param_groups[1]["lr"] == pytest.approx(_cosine(6, 6e-3, 0.0))
    kept = _scheduler(6e-3, use_checkpoint_opt_param_scheduler=True)
    kept.load_state_dict(state)
    assert kept.optimizer.param_groups[1]["lr"] == pytest.approx(_cosine(6, 5e-3, 0.0))
    with pytest.raises(ConfigError, match=r"trained with --decoupled-lr 0\.005; add --decoupled-lr 0\.005"):
        _scheduler(None, use_checkpoint_opt_param_scheduler=True).load_state_dict(state)


def test_keeping_a_checkpoints_schedule_without_decoupled_lr_drops_the_flags_bounds():
    """--use-checkpoint-opt-param-scheduler with a checkpoint trained without --decoupled-lr: the tagged group
    follows the checkpoint's one schedule, its max and its floor both, not the flags' --decoupled-(min-)lr."""
    saved = _scheduler(None)
    saved.step(6)
    kept = _scheduler(6e-3, use_checkpoint_opt_param_scheduler=True)
    kept.optimizer.param_groups[1]["min_lr"] = 1e-4  # the flags' --decoupled-min-lr, above the main floor 0
    kept.load_state_dict(saved.state_dict())
    rates = [group["lr"] for group in kept.optimizer.param_groups]
    assert rates == pytest.approx([_cosine(6, LR, 0.0)] * 2, rel=1e-12)


DECOUPLED = ["--decoupled-lr", "3e-2", "--decoupled-min-lr", "1e-3"]


def test_pretrain_decoupled_lr_under_tp2_pp2_reproduces_one_process():
    plain = _logged(run_distributed(_train, 1, TINY, timeout=120))
    same = _logged(run_distributed(_train, 1, TINY + ["--decoupled-lr", "3e-3", "--decoupled-min-lr", "3e-4"],
                                   timeout=120))
    assert same.losses == plain.losses  # the group with the main bounds changes nothing
    serial = _logged(run_distributed(_train, 1, TINY + DECOUPLED, timeout=120))
    assert serial.losses[2:] != pytest.approx(plain.losses[2:], rel=1e-3)  # the rates reach the update
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    parallel = _logged(run_distributed(_train, 4, TINY + DECOUPLED + layout, timeout=180))
    for i, (got, want) in enumerate(zip(parallel.losses, serial.losses, strict=True), start=1):
        assert abs(got - want) <= 1e-5 * abs(want), f"iteration {i}: {got} vs one process {want}"


@pytest.mark.parametrize("fmt,world,layout", [
    ("torch", 2, ["--use-distributed-optimizer"]),
    ("torch_dist", 2, ["--pipeline-model-parallel-size", "2"]),
], ids=["legacy-zero1", "torch-dist-pp2"])
def test_resume_keeps_the_decoupled_rates(tmp_path, fmt, world, layout):
    argv = TINY + DECOUPLED + layout + ["--train-iters", "10", "--eval-iters", "0", "--ckpt-format", fmt]
    whole = _logged(run_distributed(_train, world, argv, timeout=180))
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_train, world, argv + ["--save", ckpt, "--exit-interval", "5"], timeout=180)
    rest = _logged(run_distributed(_train, world, argv + ["--load", ckpt], timeout=180))
    assert rest.loaded_iteration == 5
    for i, (got, want) in enumerate(zip(rest.losses, whole.losses[5:], strict=True), start=6):
        assert abs(got - want) <= 1e-5 * abs(want), f"iteration {i}: resumed {got} vs uninterrupted {want}"
    changed = [a if a != "3e-2" else "2e-2" for a in argv]
    with pytest.raises(Exception, match="has decoupled_lr = 0.03 but the flags give 0.02"):
        run_distributed(_train, world, changed + ["--load", ckpt], timeout=180)


def test_converted_checkpoint_keeps_the_decoupled_group(tmp_path):
    """tools/checkpoint/convert.py re-shards the --decoupled-lr group's Adam state: TP 2 saved at iteration
    3, converted to PP 2, resumes as the TP 2 run continues."""
    from equivalence import assert_rel_close
    from test_checkpoint_convert_optimizer import ARGS, _cli
    whole_dir, resumed_dir = str(tmp_path / "whole"), str(tmp_path / "pp2")
    args = ARGS + DECOUPLED + ["--train-iters", "6"]
    whole = _logged(run_distributed(_train, 2, args + ["--tensor-model-parallel-size", "2", "--save", whole_dir],
                                    timeout=240))
    assert _cli(whole_dir, resumed_dir, "--load-iteration", 3, "--target-pipeline-parallel-size", 2) == 0
    rest = _logged(run_distributed(_train, 2, args + ["--pipeline-model-parallel-size", "2", "--load", resumed_dir,
                                                      "--save", resumed_dir, "--no-load-rng"],  # a re-shard has none
                                   timeout=240))
    assert rest.loaded_iteration == 3
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[3:]), what="losses after the resume")


def test_a_legacy_checkpoint_of_the_other_grouping_names_the_decoupled_flag(tmp_path):
    # The legacy optimizer state is stored per param group: a resume adding or dropping --decoupled-lr
    # failed as 'loaded state dict has a different number of parameter groups' naming only --no-load-optim.
    argv = TINY + ["--eval-iters", "0", "--ckpt-format", "torch", "--train-iters", "2"]
    without, with_group = str(tmp_path / "without"), str(tmp_path / "with")
    run_distributed(_train, 1, argv + ["--save", without], timeout=120)
    run_distributed(_train, 1, argv + DECOUPLED + ["--save", with_group], timeout=120)
    later = argv[:-1] + ["4", "--override-opt-param-scheduler"]
    with pytest.raises(Exception, match=r"iter_0000002/mp_rank_00: the optimizer state was saved without "
                                        r"--decoupled-lr and this run has its param group .*; drop --decoupled-lr, "
                                        r"or pass --no-load-optim"):
        run_distributed(_train, 1, later + DECOUPLED + ["--load", without], timeout=120)
    with pytest.raises(Exception, match=r"the optimizer state was saved with --decoupled-lr .* and this run has "
                                        r"none; add --decoupled-lr 0.03 \(and its --decoupled-min-lr\), or pass "
                                        r"--no-load-optim"):
        run_distributed(_train, 1, later + ["--load", with_group], timeout=120)


def _rates_in_log(out):
    """{iteration: (learning rate, decoupled learning rate or None)} from the progress lines."""
    rates = {}
    for line in out.splitlines():
        it = re.search(r"iteration\s+(\d+)/", line)
        lr = re.search(r"\| learning rate: (\S+) \|", line)
        if it and lr:
            decoupled = re.search(r"\| decoupled learning rate: (\S+) \|", line)
            rates[int(it.group(1))] = (float(lr.group(1)), float(decoupled.group(1)) if decoupled else None)
    return rates


@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]],
                         ids=["one-process", "tp2-pp2"])
def test_the_progress_line_shows_both_learning_rates_as_megatron(capfd, layout):
    run_distributed(_train, 1 if not layout else 4, TINY + DECOUPLED + layout, timeout=180)
    rates = _rates_in_log(capfd.readouterr().out)
    assert sorted(rates) == [5, 10, 15, 20]
    for iteration, (main, decoupled) in rates.items():
        fraction = 0.5 * (1 + math.cos(math.pi * (iteration - 2) / (20 - 2)))  # TINY: warmup 2, decay 20
        assert main == pytest.approx(3e-4 + (3e-3 - 3e-4) * fraction, rel=1e-5), iteration
        assert decoupled == pytest.approx(1e-3 + (3e-2 - 1e-3) * fraction, rel=1e-5), iteration


def test_without_decoupled_lr_the_line_has_no_decoupled_rate(capfd):
    run_distributed(_train, 1, TINY + ["--train-iters", "5"], timeout=120)
    assert list(_rates_in_log(capfd.readouterr().out).values())[0][1] is None
