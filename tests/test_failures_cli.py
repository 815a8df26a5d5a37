"""Issue #14, what a Megatron-LM user types: script flags and ``--spec`` (14), ``--help`` and ``--demo`` (15)."""
import contextlib
import io
import json
import os
import random

import pytest
from harness import run_distributed
from test_failures_training import TINY, _one, _run

from megatron_core.tokenizer.train_tokenizer import build_parser as tokenizer_parser
from megatron_core.training import checkpoint_io as io_
from megatron_core.training.arguments import build_parser, config_from_args, parse_args
from megatron_core.training.arguments.compat import refused_flags
from megatron_core.training.arguments.validate import validate_args
from megatron_core.training.errors import ConfigError

# Flags of Megatron-LM's examples/llama and examples/mixtral scripts that this framework has its own
# names for or accepts as they are, with small sizes.
LLAMA_SCRIPT = """
--use-mcore-models --transformer-impl local --ckpt-format torch --use-flash-attn --no-masked-softmax-fusion
--no-bias-gelu-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-gradient-accumulation-fusion
--no-rope-fusion --cross-entropy-loss-fusion --no-create-attention-mask-in-dataloader
--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --group-query-attention
--num-query-groups 2 --seq-length 16 --max-position-embeddings 16 --position-embedding-type rope --rotary-base 500000
--swiglu --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights
--micro-batch-size 1 --global-batch-size 4 --train-samples 64 --lr-decay-samples 48 --lr-warmup-samples 8
--lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --bf16 --mock-data --vocab-size 100
""".split()


def test_llama_script_flags_are_accepted_with_their_meaning():
    run = config_from_args(validate_args(parse_args(LLAMA_SCRIPT), world_size=1))
    assert run.model.transformer.attention_backend == "flash"
    assert run.model.spec == ("megatron_core.transformer.layer_specs", "get_gpt_layer_local_spec")
    args = validate_args(parse_args([a for a in LLAMA_SCRIPT if a != "--swiglu"] + ["--squared-relu"]), 1)
    assert config_from_args(args).model.transformer.activation == "squared_relu"
    # --squared-relu with one other activation flag is refused, either one alone.
    for other in ("--swiglu", "--openai-gelu"):
        argv = [a for a in LLAMA_SCRIPT if a != "--swiglu"] + ["--squared-relu", other]
        with pytest.raises(ConfigError, match="^give only one of --squared-relu, --swiglu and --openai-gelu$"):
            validate_args(parse_args(argv), 1)


def test_older_megatron_script_flags_are_accepted():
    """Megatron-LM spells the scheduler flags with an underscore (``--override-opt_param-scheduler``), and its
    Llama-2 / GPT scripts carry flags whose only setting is this framework's behaviour."""
    older = ["--override-opt_param-scheduler", "--no-query-key-layer-scaling", "--attention-softmax-in-fp32",
             "--auto-detect-ckpt-format", "--data-impl", "mmap", "--dataloader-type", "single"]
    run = config_from_args(validate_args(parse_args(LLAMA_SCRIPT + older), world_size=1))
    assert run.scheduler.override_opt_param_scheduler and not run.scheduler.use_checkpoint_opt_param_scheduler
    args = parse_args(LLAMA_SCRIPT + ["--use-checkpoint-opt_param-scheduler"])
    assert args.use_checkpoint_opt_param_scheduler
    with pytest.raises(ConfigError, match="--dataloader-type: invalid choice: 'cyclic'"):
        parse_args(LLAMA_SCRIPT + ["--dataloader-type", "cyclic"])


def test_megatron_llama3_and_checkpoint_script_flags_are_accepted_or_refused_with_a_reason():
    """Megatron-LM's examples/llama/train_llama3_8b_h100_fp8.sh carries --tiktoken-pattern v2,
    --no-mmap-bin-files, --decoupled-lr and --decoupled-min-lr (test_decoupled_lr.py trains with them), and its
    other scripts the torch_dist performance flags (--ckpt-fully-parallel-save ...): each was argparse's bare
    'unrecognized arguments'."""
    accepted = ["--tiktoken-pattern", "v2", "--no-mmap-bin-files", "--mmap-bin-files", "--ckpt-fully-parallel-save",
                "--no-ckpt-fully-parallel-save", "--ckpt-fully-parallel-load", "--ckpt-assume-constant-structure",
                "--use-persistent-ckpt-worker"]
    plain = config_from_args(validate_args(parse_args(LLAMA_SCRIPT), world_size=1))
    run = config_from_args(validate_args(parse_args(LLAMA_SCRIPT + accepted), world_size=1))
    assert run == plain  # no effect on the run: what each one changes in Megatron-LM is its I/O, not the result
    with pytest.raises(ConfigError, match="--tiktoken-pattern: invalid choice: 'v3'"):
        parse_args(LLAMA_SCRIPT + ["--tiktoken-pattern", "v3"])
    decoupled = config_from_args(validate_args(parse_args(LLAMA_SCRIPT + ["--decoupled-lr", "5e-4",
                                                                         "--decoupled-min-lr", "1e-5"]), world_size=1))
    assert (decoupled.optimizer.decoupled_lr, decoupled.optimizer.decoupled_min_lr) == (5e-4, 1e-5)
    for argv, message in [(["--decoupled-min-lr", "1e-5"], "--decoupled-min-lr is the floor of the --decoupled-lr "
                                                            "group; add --decoupled-lr or drop it"),
                          (["--decoupled-lr", "5e-4", "--decoupled-min-lr", "1e-3"],
                           "need 0 <= --decoupled-min-lr 0.001 <= --decoupled-lr 0.0005"),
                          (["--decoupled-lr", "-1"], "--decoupled-lr \\(the embedding and output layer's peak "
                                                     "learning rate\\) must be 0 or more, got -1.0$"),
                          (["--decoupled-lr", "1e-5"], "need 0 <= --min-lr 3e-05 <= --decoupled-lr 1e-05; give a "
                                                       "--decoupled-min-lr from 0 to 1e-05 \\(it defaults to "
                                                       "--min-lr\\)$"),
                          (["--recompute-granularity", "full", "--recompute-method", "block",
                            "--recompute-num-layers", "0"], "--recompute-num-layers must be 1 or more, got 0$")]:
        with pytest.raises(ConfigError, match=f"^{message}"):
            validate_args(parse_args(LLAMA_SCRIPT + argv), world_size=1)


def test_parallel_sizes_of_one_for_missing_parallelisms_are_accepted():
    """Megatron-LM's Llama and Qwen scripts spell out --context-parallel-size 1 --expert-model-parallel-size 1
    --expert-tensor-parallel-size 1: sizes that mean "off" were refused as if context or expert parallelism had
    been asked for ("drop the flag (context parallel size 1)")."""
    off = ["--context-parallel-size", "1", "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1"]
    plain = config_from_args(validate_args(parse_args(LLAMA_SCRIPT), world_size=1))
    assert config_from_args(validate_args(parse_args(LLAMA_SCRIPT + off), world_size=1)) == plain
    for flag, value in (("--context-parallel-size", "2"), ("--expert-tensor-parallel-size", "4")):
        with pytest.raises(ConfigError, match=f"^{flag}: "):
            parse_args(LLAMA_SCRIPT + [flag, value])


def test_transformer_impl_transformer_engine_without_it_names_the_flag():
    """It said "--spec megatron_core.transformer.layer_specs get_gpt_layer_te_spec: ...; give a module importable
    from the working directory or PYTHONPATH (...)": a flag the user never gave and a fix that does not apply."""
    from megatron_core.transformer.te_spec import HAVE_TE, TE_IMPORT_ERROR

    if HAVE_TE:
        pytest.skip("transformer_engine is installed here")
    with pytest.raises(ConfigError) as info:
        validate_args(parse_args(LLAMA_SCRIPT + ["--transformer-impl", "transformer_engine"]), world_size=1)
    assert str(info.value) == (f"--transformer-impl transformer_engine: transformer_engine failed to import "
                               f"({TE_IMPORT_ERROR}); install it on a CUDA machine or pass --transformer-impl local")


@pytest.mark.parametrize("argv,needle", [
    (["--num-experts", "8", "--moe-router-topk", "2"], "--num-experts: mixture-of-experts"),
    (["--expert-model-parallel-size", "2"], "mixture-of-experts"),
    (["--wandb-project", "llama"], "--wandb-project: Weights & Biases logging is not supported; log to TensorBoard"),
    (["--fp8-format", "hybrid"], "FP8 training needs Transformer Engine"),
    (["--async-save", "--ckpt-format", "torch"], "--async-save writes torch_dist checkpoints; drop --ckpt-format"),
])
def test_refused_flags_say_why(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate_args(parse_args(LLAMA_SCRIPT + argv), world_size=1)


def test_every_refused_flag_is_one_line_not_unrecognized():
    for flag in refused_flags():
        with pytest.raises(ConfigError) as info:
            parse_args(LLAMA_SCRIPT + [flag, "2"])  # 2: not the size 1 that --context-parallel-size 1 ... accept
        assert str(info.value).startswith(f"{flag}: ") and "unrecognized" not in str(info.value)


def test_spec_picks_a_custom_layer_from_the_command_line(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    legacy = ["--ckpt-format", "torch"]  # reads the legacy model file below
    result = _one(TINY + legacy + ["--spec", "models.custom_spec", "qk_norm_layer_spec", "--save", ckpt])
    assert not isinstance(result, str), result
    state = io_.load_file(os.path.join(io_.iteration_dir(ckpt, 2), "mp_rank_00", io_.MODEL_FILENAME))
    assert any("q_layernorm" in key for key in state["model"]) and any("k_layernorm" in key for key in state["model"])
    message = run_distributed(_run, 1, TINY + ["--spec", "models.custom_spec", "no_such_spec"], timeout=60)[0]
    assert message == ("ConfigError: --spec models.custom_spec no_such_spec: module models.custom_spec has no "
                       "no_such_spec")


def test_help_shows_defaults_and_tokenizer_flags_have_help():
    text = build_parser().format_help()
    for flag, default in (("--lr-decay-style", "linear"), ("--split", "969,30,1"), ("--seed", "1234"),
                          ("--micro-batch-size", None), ("--ckpt-format", None)):
        block = text[text.index(f"  {flag} "):][:400].split("\n  --")[0]
        assert (f"(default: {default})" in " ".join(block.split())) == (default is not None), block
    for action in tokenizer_parser()._actions:
        assert action.help, f"tools/train_tokenizer.py {action.option_strings} has no help"


def _corpus(path):
    """Enough varied text for the demo's 1024-token tokenizer."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(300):
            words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
                     for _ in range(60)]
            f.write(json.dumps({"text": f"def f_{i}(x):\n    return {' '.join(words)}\n"}) + "\n")


def test_demo_input_names_its_dataset_and_a_rerun_resumes(tmp_path, capfd):
    corpus = tmp_path / "my.jsonl"
    _corpus(corpus)
    demo = str(tmp_path / "demo")
    small = ["--demo", "--demo-dir", demo, "--demo-input", str(corpus), "--num-layers", "1", "--hidden-size", "16",
             "--num-attention-heads", "2", "--seq-length", "16", "--max-position-embeddings", "16",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--eval-iters", "1",
             "--log-interval", "1", "--save-interval", "2", "--lr-warmup-iters", "1"]
    first = _one(small)
    assert not isinstance(first, str), first
    assert os.path.isfile(os.path.join(demo, "my_text_document.bin"))
    assert not os.path.exists(os.path.join(demo, "stdlib_text_document.bin"))
    capfd.readouterr()
    again = _one(small)
    out = capfd.readouterr().out
    assert again.loaded_iteration == 2 and again.exit_reason == "nothing-to-train", out[-2000:]
    assert "> nothing to train" in out


def test_demo_input_of_sentence_lists_is_read_as_the_data_tools_read_it(tmp_path, capfd):
    """A --demo-input whose "text" values are lists of sentences (Megatron-LM's sentence-split JSONL, which
    preprocess_data and train_tokenizer read) is prepared, one document per line; a list holding a number is
    one line naming the line. It was refused: 'expected a JSON object with a string "text" field'."""
    import pretrain_gpt

    plain, lists = tmp_path / "plain.jsonl", tmp_path / "lists.jsonl"
    _corpus(plain)
    with open(plain) as f, open(lists, "w") as out:
        for line in f:
            text = json.loads(line)["text"]
            out.write(json.dumps({"text": [text[:20], text[20:]]}) + "\n")
    demo = str(tmp_path / "demo")
    assert pretrain_gpt.main(["--demo-prepare-only", "--demo-dir", demo, "--demo-input", str(lists)]) is None
    assert "using 300 documents from" in capfd.readouterr().out
    from megatron_core.datasets import IndexedDataset

    assert len(IndexedDataset(os.path.join(demo, "lists_text_document"))) == 300
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ["fine", 3]}\n')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = pretrain_gpt.cli(["--demo-prepare-only", "--demo-dir", demo, "--demo-input", str(bad)])
    assert code == 2 and err.getvalue() == (f"error: --demo-input {bad}:1: expected a JSON object with a \"text\" "
                                            f"field holding a string or a list of strings: fix or delete that line\n")


def test_cli_bad_flag_is_one_line():
    err = io.StringIO()
    import pretrain_gpt

    with contextlib.redirect_stderr(err):
        code = pretrain_gpt.cli(["--wandb-project", "x"])
    assert code == 2 and err.getvalue().count("\n") == 1 and "Weights & Biases" in err.getvalue()
