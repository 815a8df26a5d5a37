"""pretrain_gpt.py with --ckpt-format torch_dist: resume under another layout with the optimizer, the
iteration, the consumed samples and the schedule; --async-save; --use-checkpoint-args.

The reference is one uninterrupted run in the saving layout. Adam's eps is 1e-4 (as test_ddp_gpt):
with eps 1e-8 its 1/sqrt(v) turns reduction-order noise on near-zero gradients into full steps, so
two layouts agree only to about 1e-4 after a few steps even without a checkpoint in between.
"""
import re

import pytest
import torch
from equivalence import assert_rel_close
from harness import run_distributed
from test_pretrain import TINY, _logged, _refused, _train

ARGS = [*TINY, "--train-iters", "8", "--eval-interval", "100", "--eval-iters", "0", "--adam-eps", "1e-4",
        "--lr-warmup-iters", "3", "--ckpt-format", "torch_dist"]


@pytest.mark.parametrize("saved,resumed,logged", [
    ((2, ["--tensor-model-parallel-size", "2"]), (2, ["--use-distributed-optimizer"]),
     ("TP 2 x PP 1 x DP 1, ZeRO stage 0", "TP 1 x PP 1 x DP 2, ZeRO stage 1")),
    ((2, ["--zero-stage", "3"]), (2, ["--tensor-model-parallel-size", "2"]),
     ("TP 1 x PP 1 x DP 2, ZeRO stage 3", "TP 2 x PP 1 x DP 1, ZeRO stage 0")),
    ((2, ["--tensor-model-parallel-size", "2"]), (2, ["--zero-stage", "3"]),
     ("TP 2 x PP 1 x DP 1, ZeRO stage 0", "TP 1 x PP 1 x DP 2, ZeRO stage 3")),
], ids=["tp2-to-dp2-zero1", "dp2-zero3-to-tp2", "tp2-to-dp2-zero3"])
def test_resume_under_another_layout_continues_the_run(tmp_path, capfd, saved, resumed, logged):
    (world, layout), (new_world, new_layout) = saved, resumed
    whole = _logged(run_distributed(_train, world, ARGS + layout, timeout=240))
    ckpt = str(tmp_path / "ckpt")
    first = _logged(run_distributed(_train, world, ARGS + layout + ["--save", ckpt, "--exit-interval", "4"],
                                    timeout=240))
    assert first.iteration == 4 and first.saved_iterations == [4]
    capfd.readouterr()
    rest = _logged(run_distributed(_train, new_world, ARGS + new_layout + ["--load", ckpt], timeout=240))
    assert rest.loaded_iteration == 4 and rest.consumed_train_samples == whole.consumed_train_samples
    out = capfd.readouterr().out
    saved_under, resumed_under = logged
    assert f"> loaded torch_dist checkpoint from {ckpt} at iteration 4 (saved under {saved_under}, resumed under " \
           f"{resumed_under}; optimizer: yes)" in out, out[-3000:]
    assert f"RNG states were saved under {saved_under}, this run is {resumed_under}: they do not carry over" in out
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[4:]), what="losses after the resume")


def test_async_save_and_use_checkpoint_args(tmp_path, capfd):
    ckpt = str(tmp_path / "ckpt")
    whole = _logged(run_distributed(_train, 1, ARGS, timeout=240))
    capfd.readouterr()
    _logged(run_distributed(_train, 1, ARGS + ["--save", ckpt, "--save-interval", "2", "--exit-interval", "4",
                                               "--async-save"], timeout=240))
    out = capfd.readouterr().out
    for iteration in (2, 4):  # each save's start, then its end (before the next save, and at exit)
        started = out.index(f"started an asynchronous save of checkpoint at iteration {iteration:7d} to {ckpt}")
        assert out.index(f"successfully saved checkpoint at iteration {iteration:7d} to {ckpt} (torch_dist, "
                         f"asynchronous save finished)") > started, out[-3000:]
    assert out.count("asynchronous save finished") == 2, out[-3000:]
    capfd.readouterr()
    _logged(run_distributed(_train, 1, ARGS + ["--save", str(tmp_path / "sync"), "--save-interval", "2",
                                               "--exit-interval", "4"], timeout=240))
    out = capfd.readouterr().out  # a synchronous save said "asynchronous save finished" too, when the next began
    assert "asynchronous" not in out and out.count("successfully saved checkpoint at iteration") == 2, out[-3000:]
    # No model flags at all: they come from the checkpoint.
    model_flags = {"--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--vocab-size"}
    argv, skip = [], False
    for token in ARGS:
        if skip:
            skip = False
            continue
        if token in model_flags:
            skip = True
            continue
        argv.append(token)
    rest = _logged(run_distributed(_train, 2, argv + ["--load", ckpt, "--use-checkpoint-args"], timeout=240))
    assert rest.loaded_iteration == 4
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[4:]),
                     what="losses after an async save, read back at DP 2")


def test_resume_under_another_vocabulary_padding(tmp_path, capfd):
    """64 tokens pad to 128 rows at TP 1 and 256 at TP 2 (--make-vocab-size-divisible-by 128 x TP): the resume
    says so and goes on; with a --make-vocab-size-divisible-by giving the saved 128 rows it is exact."""
    args = ARGS + ["--vocab-size", "63"]
    whole = _logged(run_distributed(_train, 1, args, timeout=240))
    ckpt = str(tmp_path / "ckpt")
    _logged(run_distributed(_train, 1, args + ["--save", ckpt, "--exit-interval", "4"], timeout=240))
    capfd.readouterr()
    tp2 = args + ["--tensor-model-parallel-size", "2", "--load", ckpt]
    padded = _logged(run_distributed(_train, 2, tp2, timeout=240))
    assert padded.loaded_iteration == 4 and len(padded.losses) == 4
    assert "the vocabulary is padded to 256 rows here, 128 in the checkpoint" in capfd.readouterr().out
    exact = _logged(run_distributed(_train, 2, tp2 + ["--make-vocab-size-divisible-by", "64"], timeout=240))
    assert "the vocabulary is padded" not in capfd.readouterr().out
    assert_rel_close(torch.tensor(exact.losses), torch.tensor(whole.losses[4:]), what="losses after the resume")


def test_no_load_optim_under_the_distributed_optimizer_starts_from_the_loaded_weights(tmp_path):
    """--no-load-optim: the distributed optimizer's fp32 main shard must follow the loaded weights (not
    keep the initialisation), so training continues exactly as under the plain optimizer (DP 1, fp32)."""
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_train, 1, ARGS + ["--use-distributed-optimizer", "--save", ckpt, "--exit-interval", "4"],
                    timeout=120)
    resume = ARGS + ["--load", ckpt, "--no-load-optim", "--exit-interval", "6"]
    plain = _logged(run_distributed(_train, 1, resume, timeout=120))
    sharded = _logged(run_distributed(_train, 1, resume + ["--use-distributed-optimizer"], timeout=120))
    assert plain.loaded_iteration == sharded.loaded_iteration == 4 and len(sharded.losses) == 2
    assert_rel_close(torch.tensor(sharded.losses), torch.tensor(plain.losses), 1e-5, "losses after --no-load-optim")


def test_no_load_optim_leaves_the_schedule_out_as_the_legacy_format_and_megatron_lm(tmp_path):
    """--no-load-optim skips the learning-rate schedule with the optimizer (Megatron-LM loads the scheduler
    inside its ``not args.no_load_optim`` branch, and the legacy format here did so). From torch_dist the
    schedule was loaded and checked: a resume with another --train-iters was refused ('lr_decay_steps = 64
    but the flags give 48'). Both formats now continue alike: the same losses from the same weights."""
    resumed = {}
    for fmt in ("torch", "torch_dist"):
        ckpt = str(tmp_path / fmt)
        run_distributed(_train, 1, ARGS + ["--ckpt-format", fmt, "--save", ckpt, "--exit-interval", "4"], timeout=120)
        resumed[fmt] = _logged(run_distributed(_train, 1, ARGS + ["--ckpt-format", fmt, "--load", ckpt,
                                                                  "--no-load-optim", "--train-iters", "6"],
                                               timeout=120))
    assert [r.loaded_iteration for r in resumed.values()] == [4, 4]
    assert [len(r.losses) for r in resumed.values()] == [2, 2]
    assert_rel_close(torch.tensor(resumed["torch_dist"].losses), torch.tensor(resumed["torch"].losses),
                     what="losses after --no-load-optim, torch_dist vs legacy")


def test_no_save_optim_and_no_save_rng_leave_them_out_and_a_resume_must_skip_them(tmp_path, capfd):
    """--no-save-optim / --no-save-rng were ignored by torch_dist: the checkpoint held the Adam state and the
    RNG states (byte for byte the size of a full one), and a resume loaded them. Both formats now leave them out.
    A resume without --no-load-optim then went on with a fresh optimizer, saying only 'optimizer: no' (the legacy
    format also skipped the RNG states without a word): it stops now in one line naming the flags, as Megatron-LM's
    load_checkpoint ('Unable to load optimizer from checkpoint ... Specify --no-load-optim or --finetune').
    torch_dist skips missing RNG states, as Megatron-LM's does; with the flags both formats continue alike.
    The learning-rate schedule goes with the optimizer, as Megatron-LM's generate_state_dict saves it: it was
    kept (never read back: --no-load-optim skips it); the resume starts the schedule again from its first step."""
    from megatron_core.dist_checkpointing import read_common
    from megatron_core.training import checkpoint_io as io

    skip = {"torch": ["--no-load-optim", "--no-load-rng"], "torch_dist": ["--no-load-optim"]}
    resumed = {}
    for fmt in ("torch", "torch_dist"):
        ckpt = str(tmp_path / fmt)
        run_distributed(_train, 1, ARGS + ["--ckpt-format", fmt, "--save", ckpt, "--exit-interval", "4",
                                           "--no-save-optim", "--no-save-rng"], timeout=120)
        resume = ARGS + ["--ckpt-format", fmt, "--load", ckpt, "--exit-interval", "6"]
        message = run_distributed(_refused, 1, resume, timeout=120)[0]
        saved = "--no-save-optim --no-save-rng (it holds no optimizer or RNG state)" if fmt == "torch" else \
            "--no-save-optim (it holds no optimizer state)"
        assert message == (f"checkpoint {ckpt}/iter_0000004 was saved with {saved} and this run would load it: "
                           f"pass {' '.join(skip[fmt])} (or --finetune) to resume from its weights without it")
        if fmt == "torch":  # both flags are needed: one alone still stops, naming the other
            message = run_distributed(_refused, 1, resume + ["--no-load-optim"], timeout=120)[0]
            assert message is not None and "was saved with --no-save-rng (it holds no RNG state)" in message \
                and "pass --no-load-rng (or --finetune)" in message, message
        capfd.readouterr()
        resumed[fmt] = _logged(run_distributed(_train, 1, resume + skip[fmt], timeout=120))
        out = capfd.readouterr().out
        assert "optimizer: no" in out, out[-2000:]
        # Iteration 5 (logged) is the schedule's first step again: 3e-3 x 1/3 of ARGS' --lr-warmup-iters 3, as
        # Megatron-LM builds a fresh OptimizerParamScheduler and --no-load-optim leaves it so.
        assert re.search(r"iteration +5/ +8 \|.*\| learning rate: 1\.000000E-03 \|", out), out[-2000:]
    common = read_common(str(tmp_path / "torch_dist"))
    assert not common["optimizer"] and not common["rng"] and common["scheduler"] is None
    legacy = io.load_file(str(tmp_path / "torch" / "iter_0000004" / "mp_rank_00" / io.MODEL_FILENAME))
    assert "optimizer" not in legacy and "opt_param_scheduler" not in legacy and "rng_state" not in legacy
    assert common["extra"]["save_flags"] == {"optimizer": False, "rng": False}
    assert [r.loaded_iteration for r in resumed.values()] == [4, 4]
    assert_rel_close(torch.tensor(resumed["torch_dist"].losses), torch.tensor(resumed["torch"].losses),
                     what="losses after a --no-save-optim checkpoint, torch_dist vs legacy")


@pytest.mark.parametrize("flags", [[], ["--use-distributed-optimizer"]], ids=["sgd", "sgd-distributed-optimizer"])
def test_sgd_momentum_resumes_from_torch_dist(tmp_path, flags):
    """SGD keeps a momentum_buffer and no step count; torch_dist restored a parameter's state only with a
    step, so the resumed run started with no momentum (losses off by 1e-3 relative after one step, where
    the legacy format resumes exactly). Now the run continues as the uninterrupted one."""
    args = ARGS + ["--optimizer", "sgd", "--sgd-momentum", "0.9", *flags]
    whole = _logged(run_distributed(_train, 1, args, timeout=240))
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_train, 1, args + ["--save", ckpt, "--exit-interval", "4"], timeout=240)
    rest = _logged(run_distributed(_train, 1, args + ["--load", ckpt], timeout=240))
    assert rest.loaded_iteration == 4
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[4:]), what="losses after the resume")



def test_finetune_from_torch_dist_is_logged_and_starts_at_iteration_0(tmp_path, capfd):
    """--finetune from torch_dist: the weights only, from iteration 0, and the log line saying so (as the legacy
    format's 'loaded model weights from ... for finetuning'); no test read that line before."""
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_train, 1, ARGS + ["--save", ckpt, "--exit-interval", "4"], timeout=120)
    capfd.readouterr()
    tuned = _logged(run_distributed(_train, 1, ARGS + ["--load", ckpt, "--finetune", "--train-iters", "2"],
                                    timeout=120))
    out = capfd.readouterr().out
    assert (tuned.loaded_iteration, tuned.iteration) == (0, 2)
    assert f"> loaded model weights from {ckpt} (torch_dist) for finetuning: starting at iteration 0\n" in out, \
        out[-2000:]
    assert "> loaded torch_dist checkpoint from" not in out


def test_ckpt_convert_format_takes_a_legacy_distributed_optimizer_to_another_dp_size(tmp_path):
    """Megatron-LM's --ckpt-convert-format / --ckpt-convert-save (the flags were unknown): a legacy checkpoint's
    distributed-optimizer shards load only at the DP size that saved them; converted to torch_dist under that
    size, the run resumes at DP 1 with its optimizer and continues the uninterrupted DP 2 run."""
    zero1 = [*ARGS, "--use-distributed-optimizer"]
    whole = _logged(run_distributed(_train, 2, zero1, timeout=240))
    ckpt, conv = str(tmp_path / "ckpt"), str(tmp_path / "conv")
    run_distributed(_train, 2, zero1 + ["--ckpt-format", "torch", "--save", ckpt, "--exit-interval", "4"], timeout=240)
    converted = _logged(run_distributed(_train, 2, zero1 + ["--load", ckpt, "--ckpt-convert-format", "torch_dist",
                                                            "--ckpt-convert-save", conv], timeout=240))
    assert (converted.exit_reason, converted.saved_iterations, converted.losses) == ("converted", [4], [])
    rest = _logged(run_distributed(_train, 1, zero1 + ["--load", f"{conv}/torch_dist"], timeout=240))
    assert rest.loaded_iteration == 4 and rest.consumed_train_samples == whole.consumed_train_samples
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[4:]), what="losses after the conversion")


def test_ckpt_convert_format_writes_only_what_it_loaded(tmp_path):
    """--ckpt-convert-format saved the run's own state for a part its load skipped: converted with --no-load-rng,
    the legacy files held this run's fresh seeding as the saved run's; a --no-save-optim checkpoint converted with
    --no-load-optim held a fresh optimizer (and the schedule), recorded as saved, which a resume loaded without a
    word. The conversion now leaves out what it did not load and records so; a resume must skip it."""
    from megatron_core.dist_checkpointing import read_common
    from megatron_core.training import checkpoint_io as io

    full, conv = str(tmp_path / "full"), str(tmp_path / "conv")
    run_distributed(_train, 1, ARGS + ["--save", full, "--exit-interval", "2"], timeout=120)
    converted = _logged(run_distributed(_train, 1, ARGS + ["--load", full, "--no-load-rng", "--ckpt-convert-format",
                                                           "torch", "--ckpt-convert-save", conv], timeout=120))
    assert converted.exit_reason == "converted"
    legacy = io.load_file(f"{conv}/torch/iter_0000002/mp_rank_00/{io.MODEL_FILENAME}")
    assert "rng_state" not in legacy and "optimizer" in legacy and "opt_param_scheduler" in legacy
    assert legacy["save_flags"] == {"optimizer": True, "rng": False,
                                    "written_by": "pretrain_gpt.py --ckpt-convert-format"}
    message = run_distributed(_refused, 1, ARGS + ["--ckpt-format", "torch", "--load", f"{conv}/torch",
                                                   "--exit-interval", "3"], timeout=120)[0]
    assert message == (f"checkpoint {conv}/torch/iter_0000002 was written by pretrain_gpt.py --ckpt-convert-format "
                       f"(it holds no RNG state) and this run would load it: pass --no-load-rng (or --finetune) to "
                       f"resume from its weights without it")
    no_optim, conv2 = str(tmp_path / "no_optim"), str(tmp_path / "conv2")
    run_distributed(_train, 1, ARGS + ["--ckpt-format", "torch", "--save", no_optim, "--exit-interval", "2",
                                       "--no-save-optim"], timeout=120)
    run_distributed(_train, 1, ARGS + ["--load", no_optim, "--no-load-optim", "--ckpt-convert-format", "torch_dist",
                                       "--ckpt-convert-save", conv2], timeout=120)
    common = read_common(f"{conv2}/torch_dist")
    assert not common["optimizer"] and common["scheduler"] is None and common["rng"]
    assert common["extra"]["save_flags"]["optimizer"] is False
    message = run_distributed(_refused, 1, ARGS + ["--load", f"{conv2}/torch_dist", "--exit-interval", "3"],
                              timeout=120)[0]
    assert message is not None and "(it holds no optimizer state)" in message and "pass --no-load-optim" in message
