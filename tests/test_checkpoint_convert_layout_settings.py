"""tools/checkpoint/convert.py: the training settings that depend on the layout do not stop a re-shard.

Sequence parallelism and block recompute change no weight. A TP 2 run with ``--sequence-parallel``
re-sharded to TP 1, or a run recomputing 2 layers per chunk by blocks re-sharded to one layer per
chunk, was refused ("sequence_parallel=True needs --tensor-model-parallel-size > 1"); Megatron-LM's
converter writes both (its ``validate_args`` turns sequence parallelism off at TP 1, and its block
recompute of more layers than a chunk holds recomputes them all). The re-sharded checkpoint resumes
under the new layout with the losses of the uninterrupted run. Also two --load-dir / --loader mistakes,
one line each.
"""
import pytest
import torch
from equivalence import assert_rel_close
from harness import run_distributed
from test_checkpoint_convert import _cli

ARGS = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "0.1",
        "--optimizer", "sgd", "--sgd-momentum", "0", "--mock-data", "--vocab-size", "255", "--log-interval", "1",
        "--eval-iters", "0", "--num-workers", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--seed", "7", "--ckpt-format", "torch", "--make-vocab-size-divisible-by", "64"]
BLOCK = ["--recompute-granularity", "full", "--recompute-method", "block"]


@pytest.mark.parametrize("saved,target,resumed", [
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], [], []),
    (BLOCK + ["--recompute-num-layers", "2"],
     ["--target-pipeline-parallel-size", "2", "--target-virtual-pipeline-parallel-size", "2"],
     BLOCK + ["--recompute-num-layers", "1", "--pipeline-model-parallel-size", "2",
              "--num-layers-per-virtual-pipeline-stage", "1"]),
], ids=["sequence_parallel_to_tp1", "block_recompute_to_one_layer_chunks"])
def test_a_layout_only_setting_does_not_stop_a_reshard(saved, target, resumed, tmp_path, capsys):
    from test_pretrain import _logged, _train
    ckpt = str(tmp_path / "ckpt")
    ranks = 2 if "--tensor-model-parallel-size" in saved else 1
    whole = _logged(run_distributed(_train, ranks, ARGS + saved + ["--save", ckpt, "--save-interval", "2"],
                                    timeout=240))
    capsys.readouterr()
    assert _cli("core", "core", ckpt, tmp_path / "out", "--load-iteration", 2, *target) == 0, capsys.readouterr().err
    world = 2 if "--pipeline-model-parallel-size" in resumed else 1
    # A re-shard carries no RNG states (save_flags records so): the resume says --no-load-rng.
    rest = _logged(run_distributed(_train, world, ARGS + resumed + ["--load", str(tmp_path / "out"), "--no-load-rng"],
                                   timeout=240))
    assert rest.loaded_iteration == 2
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[2:]), what="losses after the resume")


def test_an_iteration_directory_and_an_unknown_loader_are_one_line_errors(tmp_path, capsys):
    """An iter_NNNNNNN folder given as --load-dir was 'not a Megatron checkpoint directory (for a Hugging Face
    directory use --loader hf)'; an unknown --loader ended by SystemExit with exit status 1 and no prefix."""
    from test_pretrain import _train
    run_distributed(_train, 1, ARGS + ["--train-iters", "1", "--save", str(tmp_path / "ckpt")], timeout=120)
    capsys.readouterr()
    assert _cli("core", "hf", tmp_path / "ckpt" / "iter_0000001", tmp_path / "hf") == 2
    assert capsys.readouterr().err == (f"convert.py: error: --load-dir {tmp_path / 'ckpt' / 'iter_0000001'} is one "
                                       f"iteration's directory: pass --load-dir {tmp_path / 'ckpt'} --load-iteration "
                                       f"1\n")
    assert _cli("bogus", "hf", tmp_path / "ckpt", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert err.startswith("convert.py: error: --loader 'bogus' is not supported; use one of core, hf,") and \
        err.count("\n") == 1, err
