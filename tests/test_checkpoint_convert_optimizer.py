"""tools/checkpoint/convert.py --loader core --saver core carries a legacy checkpoint's optimizer state.

Adam's moments, its step and the fp32 main parameters of a bf16 model are re-sharded with the weights:
a run resumed from the converted checkpoint under the new layout continues as the original does under
its own layout (losses and final weights), and a round trip through another layout gives back the
very same optimizer entries. A distributed optimizer's shards cannot be carried: one line says so.
"""
import os

import pytest
import torch
from equivalence import assert_rel_close
from harness import run_distributed
from test_pretrain import _logged, _refused, _train

from megatron_core.checkpoint.convert import load_core
from megatron_core.checkpoint.convert import main as convert

ARGS = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--lr-decay-style", "cosine",
        "--min-lr", "1e-3", "--mock-data", "--vocab-size", "255", "--log-interval", "1", "--eval-iters", "0",
        "--num-workers", "0", "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "7",
        "--ckpt-format", "torch", "--save-interval", "3",
        # The key bias's gradient is rounding noise (softmax ignores a shift of every key's score), which
        # Adam's 1/(sqrt(v) + eps) blows up differently under TP and PP: a larger eps, as the ZeRO tests.
        "--adam-eps", "1e-4"]


def _cli(src, dst, *extra):
    return convert(["--model-type", "GPT", "--loader", "core", "--saver", "core", "--load-dir", str(src),
                    "--save-dir", str(dst), *map(str, extra)])


def test_resharded_adam_state_resumes_as_the_original(tmp_path):
    """TP 2 saved at iteration 3, re-sharded to PP 2: iterations 4-6 under PP 2 give the losses and the
    weights the TP 2 run gives. Without the moments (--no-load-optim, the former behaviour) they do not."""
    whole_dir, resumed_dir = str(tmp_path / "whole"), str(tmp_path / "pp2")
    args = ARGS + ["--train-iters", "6"]
    whole = _logged(run_distributed(_train, 2, args + ["--tensor-model-parallel-size", "2", "--save", whole_dir],
                                    timeout=240))
    assert _cli(whole_dir, resumed_dir, "--load-iteration", 3, "--target-pipeline-parallel-size", 2) == 0
    assert _saved(resumed_dir, 3, "mp_rank_00_000")["save_flags"] == {"optimizer": True, "rng": False,
                                                                       "written_by": "tools/checkpoint/convert.py"}
    # A re-shard carries no RNG states (per rank of the layout that drew them): the resume says so.
    rest = _logged(run_distributed(_train, 2, args + ["--pipeline-model-parallel-size", "2", "--load", resumed_dir,
                                                      "--save", resumed_dir, "--no-load-rng"], timeout=240))
    assert rest.loaded_iteration == 3 and len(rest.losses) == 3
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[3:]), what="losses after the resume")
    final, expected = load_core(resumed_dir, 6).state, load_core(whole_dir, 6).state
    assert final.keys() == expected.keys()
    for name in expected:
        assert_rel_close(final[name], expected[name], what=name)
    # The moments matter: re-sharded without them (and so without the schedule), the first resumed update differs.
    assert _cli(whole_dir, tmp_path / "fresh", "--load-iteration", 3, "--target-pipeline-parallel-size", 2,
                "--no-load-optim") == 0
    fresh = _logged(run_distributed(_train, 2, args + ["--pipeline-model-parallel-size", "2", "--load",
                                                       str(tmp_path / "fresh"), "--save", str(tmp_path / "fresh"),
                                                       "--train-iters", "5", "--no-load-optim", "--no-load-rng"],
                            timeout=240))
    # Iteration 4's loss is taken before its update; iteration 5's shows the update the moments made.
    assert fresh.loaded_iteration == 3 and fresh.losses[0] == pytest.approx(whole.losses[3], rel=1e-5)
    assert abs(fresh.losses[1] - whole.losses[4]) > 1e-4 * abs(whole.losses[4]), (fresh.losses, whole.losses)



def _saved(ckpt, iteration, rank="mp_rank_00"):
    return torch.load(os.path.join(ckpt, f"iter_{iteration:07d}", rank, "model_optim_rng.pt"), weights_only=True)


def test_a_reshard_records_what_it_holds_and_a_resume_must_skip_the_rest(tmp_path, capsys):
    """A re-shard of a --no-save-optim checkpoint recorded nothing, so its resume went on with a fresh optimizer
    (and the saved schedule) without a word, as if it held the run's optimizer. The re-shard records what it wrote
    now (no optimizer, so no schedule with it, and never RNG states; the note names the flags) and the resume stops
    in one line, as one of the checkpoint it came from does; with the flags it resumes."""
    ckpt, resharded = str(tmp_path / "no_optim"), str(tmp_path / "resharded")
    args = ARGS + ["--train-iters", "4"]
    run_distributed(_train, 1, args + ["--save", ckpt, "--no-save-optim"], timeout=120)
    args += ["--save", str(tmp_path / "rest")]  # ARGS' --save-interval needs one
    capsys.readouterr()
    assert _cli(ckpt, resharded, "--load-iteration", 3) == 0
    assert capsys.readouterr().err == (f"convert.py: note: {resharded} holds no RNG or optimizer states (nor the "
                                       f"learning-rate schedule, which goes with the optimizer): resume from it with "
                                       f"--no-load-optim --no-load-rng (or --finetune)\n")
    state = _saved(resharded, 3)
    assert state["save_flags"] == {"optimizer": False, "rng": False, "written_by": "tools/checkpoint/convert.py"}
    assert not {"optimizer", "opt_param_scheduler", "rng_state"} & set(state) and state["consumed_train_samples"] == 12
    message = run_distributed(_refused, 1, args + ["--load", resharded], timeout=120)[0]
    assert message == (f"checkpoint {resharded}/iter_0000003 was written by tools/checkpoint/convert.py (it holds no "
                       f"optimizer or RNG state) and this run would load it: pass --no-load-optim --no-load-rng (or "
                       f"--finetune) to resume from its weights without it")
    rest = _logged(run_distributed(_train, 1, args + ["--load", resharded, "--no-load-optim", "--no-load-rng"],
                                   timeout=120))
    assert (rest.loaded_iteration, rest.iteration) == (3, 4)


def _optimizer_files(ckpt, iteration):
    root = os.path.join(ckpt, f"iter_{iteration:07d}")
    return {d: torch.load(os.path.join(root, d, "model_optim_rng.pt"), weights_only=True)["optimizer"]
            for d in sorted(os.listdir(root)) if d.startswith("mp_rank")}


def _assert_same(actual, expected, where):
    if torch.is_tensor(expected):
        assert torch.is_tensor(actual) and actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), (where, sorted(actual), sorted(expected))
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def test_bf16_main_params_and_moments_survive_a_round_trip(tmp_path):
    """bf16 (fp32 main parameters in the optimizer), TP 2 -> TP 1 x PP 2 x 2 virtual stages -> TP 2: every
    rank's optimizer entry is what the training run saved, element for element."""
    ckpt = str(tmp_path / "bf16")
    _logged(run_distributed(_train, 2, ARGS + ["--train-iters", "3", "--bf16", "--tensor-model-parallel-size", "2",
                                               "--save", ckpt], timeout=240))
    assert _cli(ckpt, tmp_path / "vpp", "--target-pipeline-parallel-size", 2,
                "--target-virtual-pipeline-parallel-size", 2) == 0
    vpp = _optimizer_files(str(tmp_path / "vpp"), 3)
    assert all(len(v["fp32_from_fp16_params"]) > 0 for v in vpp.values())
    assert _cli(tmp_path / "vpp", tmp_path / "back", "--target-tensor-parallel-size", 2) == 0
    original, back = _optimizer_files(ckpt, 3), _optimizer_files(str(tmp_path / "back"), 3)
    assert sorted(back) == sorted(original) == ["mp_rank_00", "mp_rank_01"]
    for rank in original:
        assert original[rank]["fp32_from_fp16_params"][0].dtype == torch.float32
        assert len(original[rank]["optimizer"]["state"]) > 0
        _assert_same(back[rank], original[rank], rank)


def test_a_distributed_optimizer_is_refused_in_one_line(tmp_path, capsys):
    """ZeRO-1 shards follow the gradient buckets of their layout: a re-shard is refused, naming --no-load-optim
    and pretrain_gpt.py's --ckpt-convert-format torch_dist; the export to Hugging Face goes on."""
    ckpt = str(tmp_path / "zero")
    _logged(run_distributed(_train, 2, ARGS + ["--train-iters", "3", "--use-distributed-optimizer", "--save", ckpt],
                            timeout=240))
    capsys.readouterr()
    assert _cli(ckpt, tmp_path / "tp2", "--target-tensor-parallel-size", 2) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"convert.py: error: {ckpt} holds a distributed optimizer")
    assert "--no-load-optim" in err and f"--load {ckpt} --ckpt-convert-format torch_dist --ckpt-convert-save DIR" in err
    assert _cli(ckpt, tmp_path / "tp2", "--target-tensor-parallel-size", 2, "--no-load-optim") == 0
    assert "optimizer" not in torch.load(os.path.join(tmp_path, "tp2", "iter_0000003", "mp_rank_00",
                                                      "model_optim_rng.pt"), weights_only=True)
    # --saver hf never reads the optimizer: the checkpoint still exports.
    assert convert(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir", ckpt,
                    "--save-dir", str(tmp_path / "hf")]) == 0


def test_vocabulary_padding_rows_are_carried(tmp_path):
    """A vocabulary of 251 (--vocab-size 250 + EOD) is padded to 256 under TP 2 and under PP 2: the re-shard
    keeps the 5 padding rows of the weights and of Adam's state (Megatron-LM's converter keeps a table of
    the same padded size as it is), so the PP 2 resume continues the TP 2 run (the padding rows' logits
    join the softmax). They were replaced by copies of the last true row: the first resumed loss was off by 2.3e-3."""
    whole_dir, resumed_dir = str(tmp_path / "whole"), str(tmp_path / "pp2")
    args = [a if a != "255" else "250" for a in ARGS] + ["--train-iters", "5"]
    whole = _logged(run_distributed(_train, 2, args + ["--tensor-model-parallel-size", "2", "--save", whole_dir],
                                    timeout=240))
    assert _cli(whole_dir, resumed_dir, "--load-iteration", 3, "--target-pipeline-parallel-size", 2) == 0
    rest = _logged(run_distributed(_train, 2, args + ["--pipeline-model-parallel-size", "2", "--load", resumed_dir,
                                                      "--save", str(tmp_path / "rest"), "--no-load-rng"], timeout=240))
    assert rest.loaded_iteration == 3 and len(rest.losses) == 2
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[3:]), what="losses after the resume")
    # Back to TP 2: every rank's weights and optimizer entry are the saved ones, padding rows included.
    assert _cli(resumed_dir, tmp_path / "back", "--load-iteration", 3, "--target-tensor-parallel-size", 2) == 0
    for rank in ("mp_rank_00", "mp_rank_01"):
        original, back = (torch.load(os.path.join(root, "iter_0000003", rank, "model_optim_rng.pt"), weights_only=True)
                          for root in (whole_dir, str(tmp_path / "back")))
        assert original["model"]["embedding.word_embeddings.weight"].shape[0] == 128
        _assert_same(back["model"], original["model"], f"{rank}.model")
        _assert_same(back["optimizer"], original["optimizer"], f"{rank}.optimizer")
