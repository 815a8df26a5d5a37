"""--use-checkpoint-args: the model, tokenizer, layout and dropout flags taken from the checkpoint in --load
(Megatron-LM's load_args_from_checkpoint), what a given flag does beside them, and a --load with no checkpoint yet."""
import pytest

from megatron_core.training.arguments import parse_args
from megatron_core.training.arguments.validate import validate_args
from megatron_core.training.errors import ConfigError
from tests.test_arguments import _base


def test_use_checkpoint_args_takes_a_relative_path_to_the_recorded_tokenizer_file(tmp_path, monkeypatch):
    """The checkpoint records /abs/tok.model; `--tokenizer-model tok.model` run from /abs names the same file
    (it was refused as disagreeing); another file is still refused."""
    import argparse

    from megatron_core.training.arguments.checkpoint_args import _set
    (tmp_path / "tok.model").write_text("x")
    (tmp_path / "other.model").write_text("x")
    monkeypatch.chdir(tmp_path)
    recorded = {"tokenizer_model": str(tmp_path / "tok.model")}
    args = argparse.Namespace(tokenizer_model="tok.model")
    _set(args, recorded, {"tokenizer_model": None})
    assert args.tokenizer_model == str(tmp_path / "tok.model")
    with pytest.raises(ConfigError, match="--tokenizer-model other.model disagrees with the checkpoint's"):
        _set(argparse.Namespace(tokenizer_model="other.model"), recorded, {"tokenizer_model": None})


def test_use_checkpoint_args_takes_the_tokenizer_directory_the_converter_copied(tmp_path):
    """convert.py --loader hf copies the directory's tokenizer beside the checkpoint (through transformers: other
    config keys); naming the original directory with --tokenizer-model was refused as disagreeing with that
    copy. Another tokenizer.json or other special tokens are still refused."""
    import argparse
    import json

    from megatron_core.training.arguments.checkpoint_args import _set
    original = {"eos_token": "</s>", "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}
    for name, text, config in (("hf", "{}", original),
                               ("copy", "{}", {"eos_token": "</s>", "tokenizer_class": "TokenizersBackend"}),
                               ("other", "{ }", {"eos_token": "</s>"}), ("other-eos", "{}", {"eos_token": "<e>"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(text)
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "tokenizer.model").write_text("sp")  # the original holds more than the copy
    recorded = {"tokenizer_model": str(tmp_path / "copy")}
    args = argparse.Namespace(tokenizer_model=str(tmp_path / "hf"))
    _set(args, recorded, {"tokenizer_model": None})
    assert args.tokenizer_model == str(tmp_path / "copy")
    for other in ("other", "other-eos"):
        with pytest.raises(ConfigError, match=f"--tokenizer-model .*{other} disagrees with the checkpoint's"):
            _set(argparse.Namespace(tokenizer_model=str(tmp_path / other)), recorded, {"tokenizer_model": None})


def test_use_checkpoint_args_takes_the_tokenizer_the_converter_stored(tmp_path):
    """An HF model converted with its tokenizer.json: --use-checkpoint-args read the model flags but then
    stopped at '--tokenizer-type is required', though the checkpoint carries its tokenizer."""
    from megatron_core.checkpoint.convert import main as convert
    from megatron_core.training.arguments import build_parser
    from megatron_core.training.arguments.checkpoint_args import apply_checkpoint_args
    from tests.hf_testing import tiny_hf_gpt2
    from tests.test_text_generation_cli import _save_tokenizer_json
    tiny_hf_gpt2(vocab_size=300).save_pretrained(tmp_path / "hf")
    _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    ckpt = str(tmp_path / "ckpt")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", ckpt]) == 0
    args = parse_args(["--load", ckpt, "--use-checkpoint-args", "--mock-data", "--micro-batch-size", "1",
                       "--train-iters", "1", "--lr", "1e-3"])
    apply_checkpoint_args(args, vars(build_parser().parse_args([])))
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer", f"{ckpt}/tokenizer")
    assert (args.hidden_size, args.num_layers) == (64, 2)


def test_use_checkpoint_args_keeps_a_given_seq_length(tmp_path):
    """--seq-length is how long the training samples are, not a shape of the weights: Megatron-LM's
    load_args_from_checkpoint keeps the command line's (``_set_arg('seq_length')`` without force). It was
    refused as disagreeing with the checkpoint's, which the converter sets to the model's position count
    (131072 for a Llama 3), so a converted model could not be fine-tuned at a shorter length with the flag."""
    from megatron_core.checkpoint.convert import main as convert
    from megatron_core.training.arguments import build_parser
    from megatron_core.training.arguments.checkpoint_args import apply_checkpoint_args
    from tests.hf_testing import tiny_hf_llama
    tiny_hf_llama(vocab_size=256).save_pretrained(tmp_path / "hf")
    ckpt = str(tmp_path / "ckpt")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", ckpt]) == 0
    defaults = vars(build_parser().parse_args([]))
    base = ["--load", ckpt, "--use-checkpoint-args", "--mock-data", "--vocab-size", "256", "--micro-batch-size", "1",
            "--train-iters", "1", "--lr", "1e-3"]
    args = parse_args(base)
    apply_checkpoint_args(args, defaults)
    saved = args.seq_length
    assert saved == args.max_position_embeddings > 8
    args = parse_args(base + ["--seq-length", "8"])
    apply_checkpoint_args(args, defaults)
    assert (args.seq_length, args.max_position_embeddings) == (8, saved)
    validate_args(args, 1)
    with pytest.raises(ConfigError, match="--hidden-size 48 disagrees with the checkpoint's"):
        apply_checkpoint_args(parse_args(base + ["--hidden-size", "48"]), defaults)


def _legacy_args_run(argv):
    import pretrain_gpt
    return pretrain_gpt.main(argv).iteration


def test_use_checkpoint_args_takes_a_legacy_checkpoints_layout_and_vocabulary_padding(tmp_path):
    """A legacy checkpoint loads only under the layout that saved it, with its padded vocabulary: Megatron-LM's
    load_args_from_checkpoint takes padded_vocab_size and forces the TP / PP / virtual sizes. Here neither was
    taken, so `--load CKPT --use-checkpoint-args` on a converted TP 2 checkpoint (padding multiple 32) stopped with
    'padded_vocab_size: checkpoint 320 vs run 384; tensor_model_parallel_size: checkpoint 2 vs run 1'."""
    from harness import run_distributed

    from megatron_core.checkpoint.convert import main as convert
    from megatron_core.training.arguments import build_parser
    from megatron_core.training.arguments.checkpoint_args import apply_checkpoint_args
    from tests.hf_testing import tiny_hf_gpt2
    tiny_hf_gpt2(vocab_size=300).save_pretrained(tmp_path / "hf")
    ckpt = str(tmp_path / "ckpt")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", ckpt, "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                    "--target-virtual-pipeline-parallel-size", "1", "--make-vocab-size-divisible-by", "32"]) == 0
    base = ["--load", ckpt, "--use-checkpoint-args", "--mock-data", "--vocab-size", "300", "--micro-batch-size", "1",
            "--train-iters", "1", "--lr", "1e-3", "--seq-length", "8", "--eval-iters", "0", "--num-workers", "0"]
    args = parse_args(base)
    apply_checkpoint_args(args, vars(build_parser().parse_args([])))
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.make_vocab_size_divisible_by, args.num_layers_per_virtual_pipeline_stage) == (32, None)
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 4 disagrees with the checkpoint's 2"):
        apply_checkpoint_args(parse_args(base + ["--tensor-model-parallel-size", "4"]),
                              vars(build_parser().parse_args([])))
    # Given at its default it is given too (it was replaced by the checkpoint's 2, and a later error named 2).
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 1 disagrees with the checkpoint's 2"):
        apply_checkpoint_args(parse_args(base + ["--pipeline-model-parallel-size", "1"]),
                              vars(build_parser().parse_args([])))
    assert run_distributed(_legacy_args_run, 4, base + ["--finetune"], timeout=120) == [1, 1, 1, 1]
    from megatron_core.training.arguments.checkpoint_args import _legacy_layout
    assert _legacy_layout({"num_layers": 8}, {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2,
                                              "virtual_pipeline_model_parallel_size": 2}) == {
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 2}


def test_use_checkpoint_args_names_the_model_file_an_iteration_lacks(tmp_path):
    """A legacy iteration directory without its model file (a copy that left out the mp_rank folders): one line
    naming the folder and file looked for, mp_rank_00 (no pipeline stages) as the saver writes it."""
    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(ConfigError) as error:
        validate_args(parse_args(_base("--load", str(tmp_path), "--use-checkpoint-args")), world_size=1)
    assert str(error.value) == (f"--load {tmp_path / 'iter_0000003'} has no mp_rank_00/model_optim_rng.pt to read "
                                f"the model flags from (--use-checkpoint-args)")


@pytest.mark.parametrize("load", ["missing", "empty"])
def test_use_checkpoint_args_without_a_checkpoint_yet_uses_the_flags_given(tmp_path, capsys, load):
    """The first launch of a script that always passes --save DIR --load DIR --use-checkpoint-args: Megatron-LM's
    load_args_from_checkpoint prints 'Checkpoint not found to provide arguments, using provided arguments.' and
    trains from scratch with the model flags given. It stopped with '--load DIR holds no checkpoint to read the
    model flags from'. --exit-on-missing-checkpoint still stops, and so does a --ckpt-step that is not there."""
    directory = tmp_path / load
    if load == "empty":
        directory.mkdir()
    argv = _base("--load", str(directory), "--save", str(directory), "--use-checkpoint-args", "--hidden-size", "48")
    args = validate_args(parse_args(argv), world_size=1)
    assert (args.num_layers, args.hidden_size) == (2, 48)
    assert capsys.readouterr().out == (f"> --use-checkpoint-args: no checkpoint in --load {directory} to take the "
                                       f"model flags from: using the flags given\n")
    for extra in (["--exit-on-missing-checkpoint"], ["--ckpt-step", "3"]):
        with pytest.raises(ConfigError, match=f"--load {directory} holds no checkpoint to read the model flags from"):
            validate_args(parse_args(argv + extra), world_size=1)


def test_no_position_embedding_with_the_checkpoint_args_of_a_rope_model(tmp_path):
    """A Llama fine-tuning script with --use-checkpoint-args --no-position-embedding: the flag turned into
    --position-embedding-type none before the checkpoint's rope was read, and the run stopped with
    '--position-embedding-type none disagrees with the checkpoint's rope', a flag the user never gave."""
    from megatron_core.checkpoint.convert import main as convert
    from tests.hf_testing import tiny_hf_llama
    tiny_hf_llama(vocab_size=256).save_pretrained(tmp_path / "hf")
    ckpt = str(tmp_path / "ckpt")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", ckpt]) == 0
    args = validate_args(parse_args(["--load", ckpt, "--use-checkpoint-args", "--no-position-embedding", "--mock-data",
                                     "--vocab-size", "256", "--micro-batch-size", "1", "--train-iters", "1", "--lr",
                                     "1e-3", "--seq-length", "8"]), world_size=1)
    assert args.position_embedding_type == "rope"


def test_use_checkpoint_args_takes_the_checkpoints_dropout_unless_given(tmp_path):
    """Megatron-LM's load_args_from_checkpoint sets --hidden-dropout and --attention-dropout from the checkpoint.
    Here they stayed at the flags' defaults (0.1): a run trained with dropout 0 and resumed with
    --use-checkpoint-args trained on with dropout 0.1 (its losses left the uninterrupted run's), and a converted
    Llama (dropout 0) was fine-tuned with dropout it never had. A dropout given on the command line still wins."""
    from megatron_core.checkpoint.convert import main as convert
    from megatron_core.training.arguments import build_parser
    from megatron_core.training.arguments.checkpoint_args import apply_checkpoint_args
    from tests.hf_testing import tiny_hf_llama
    tiny_hf_llama(vocab_size=256).save_pretrained(tmp_path / "hf")
    ckpt = str(tmp_path / "ckpt")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", ckpt]) == 0
    defaults = vars(build_parser().parse_args([]))
    assert (defaults["hidden_dropout"], defaults["attention_dropout"]) == (0.1, 0.1)
    base = ["--load", ckpt, "--use-checkpoint-args", "--mock-data", "--vocab-size", "256", "--micro-batch-size", "1",
            "--train-iters", "1", "--lr", "1e-3"]
    args = parse_args(base)
    apply_checkpoint_args(args, defaults)
    assert (args.hidden_dropout, args.attention_dropout) == (0.0, 0.0)
    args = parse_args(base + ["--hidden-dropout", "0.2"])
    apply_checkpoint_args(args, defaults)
    assert (args.hidden_dropout, args.attention_dropout) == (0.2, 0.0)
    # Given at its default (0.1) it is given too: it was taken for a flag left alone and the checkpoint's 0 won.
    args = parse_args(base + ["--attention-dropout", "0.1"])
    apply_checkpoint_args(args, defaults)
    assert (args.hidden_dropout, args.attention_dropout) == (0.0, 0.1)
