"""Megatron-LM's flags parse, map onto configs, and bad combinations fail with one clear line."""
import pytest

from megatron_core.training.arguments import config_from_args, parse_args
from megatron_core.training.arguments.validate import validate_args
from megatron_core.training.errors import ConfigError

# Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh, with small sizes (sample-based, as there).
GPT3_SCRIPT = """
--num-layers 4 --hidden-size 64 --num-attention-heads 8 --seq-length 32 --max-position-embeddings 32
--attention-backend auto
--micro-batch-size 1 --global-batch-size 16 --rampup-batch-size 4 4 64 --train-samples 800
--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16
--lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-samples 640
--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
--mock-data --vocab-file vocab.json --merge-file merges.txt --split 949,50,1
--log-interval 100 --save-interval 10000 --eval-interval 1000 --save ckpt --load ckpt --eval-iters 10
--tensorboard-dir tb
""".split()

ALSO_COMMON = """
--sequence-parallel --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--ffn-hidden-size 128 --num-query-groups 2 --group-query-attention --kv-channels 8 --position-embedding-type rope
--rotary-base 500000 --rotary-percent 1.0 --normalization RMSNorm --swiglu --disable-bias-linear
--untie-embeddings-and-output-weights --hidden-dropout 0.0 --attention-dropout 0.0
--tokenizer-type NullTokenizer --vocab-size 200 --data-cache-path cache --num-workers 0 --seed 42
--make-vocab-size-divisible-by 64 --num-layers-per-virtual-pipeline-stage 1 --recompute-granularity full
--recompute-method uniform --recompute-num-layers 1 --loss-scale 1024 --initial-loss-scale 65536
--min-loss-scale 1 --loss-scale-window 100 --hysteresis 2 --norm-epsilon 1e-6 --use-cpu-initialization
--finetune --no-load-optim --no-load-rng --optimizer adam --exit-interval 20 --exit-duration-in-mins 30
--distributed-backend gloo --log-throughput --adam-eps 1e-6 --deterministic-mode --distributed-timeout-minutes 5
""".split()


def test_gpt3_example_and_common_flags_parse_and_map():
    argv = [a for a in GPT3_SCRIPT if a != "--fp16"] + ALSO_COMMON + ["--bf16"]
    args = validate_args(parse_args(argv), world_size=8)
    assert (args.data_parallel_size, args.virtual_pipeline_model_parallel_size) == (2, 2)
    assert args.recompute_granularity == "full" and not args.add_bias_linear and args.swiglu
    run = config_from_args(args)
    t = run.model.transformer
    assert (t.num_query_groups, t.kv_channels, t.activation, t.normalization) == (2, 8, "swiglu", "RMSNorm")
    assert not t.share_embeddings_and_output_weights and t.sequence_parallel
    o = run.optimizer
    assert (o.bf16, o.adam_beta2, o.adam_eps) == (True, 0.95, 1e-6)
    d = run.ddp
    assert d.zero_stage == 1 and d.overlap_grad_reduce and d.grad_reduce_in_fp32
    assert run.checkpoint.finetune and run.logging.tensorboard_dir == "tb"
    s = run.scheduler
    assert s.lr_decay_steps == 40 * 16 and s.lr_warmup_steps == pytest.approx(0.001 * 640)


def test_the_gpt3_script_alone_validates():
    args = validate_args(parse_args(GPT3_SCRIPT + ["--vocab-size", "100"]), world_size=4)
    assert args.fp16 and args.ffn_hidden_size == 256 and args.global_batch_size == 16


def _base(*extra):
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--vocab-size", "64",
            *extra]


@pytest.mark.parametrize("extra,world,message", [
    (["--tensor-model-parallel-size", "8", "--num-attention-heads", "4"], 8,
     "--num-attention-heads 4 is not divisible"),
    (["--global-batch-size", "6"], 2, "--global-batch-size 6 is not divisible by --micro-batch-size 2"),
    (["--tensor-model-parallel-size", "3"], 4, "world size 4 is not divisible"),
    (["--fp16", "--bf16"], 1, "only one of --fp16 and --bf16"),
    (["--recompute-granularity", "full"], 1, "needs --recompute-method"),
    (["--train-samples", "100"], 1, "only one of --train-iters and --train-samples"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "needs --pipeline-model-parallel-size >= 2"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], 1, "only one of --lr-warmup-fraction"),
    (["--attention-dropout", "0.999995"], 1, "--attention-dropout 0.999995 rounds to 1 at the dropout mask"),
    # The sign first: it said "--min-lr 0.0 is larger than --lr -1.0" (Megatron-LM asserts 0 <= min_lr <= lr).
    (["--lr", "-1"], 1, "--lr is a learning rate and must be >= 0, got -1.0"),
    (["--lr", "nan"], 1, "--lr is a learning rate and must be >= 0, got nan"),
    (["--min-lr=-0.1"], 1, "--min-lr is a learning rate and must be >= 0, got -0.1"),
    (["--min-lr", "0.1"], 1, "--min-lr 0.1 is larger than --lr 0.001; the decay ends at --min-lr"),
    (["--lr-warmup-init", "0.1"], 1, "--lr-warmup-init 0.1 is larger than --lr 0.001"),
    (["--ckpt-convert-format", "torch_dist", "--load", "ckpt"], 1, "--ckpt-convert-format FORMAT converts the "
                                                                   "checkpoint in --load to --ckpt-convert-save"),
    (["--ckpt-convert-save", "out", "--ckpt-convert-format", "torch_dist"], 1, "give all three"),
])
def test_bad_combinations_name_the_fix(extra, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_args(parse_args(_base(*extra)), world)


def test_data_errors():
    argv = [a for a in _base() if a != "--mock-data"]
    with pytest.raises(ConfigError, match="no training data: give --data-path"):
        validate_args(parse_args(argv), 1)
    with pytest.raises(ConfigError, match="raw JSON; tokenize it first"):
        validate_args(parse_args(argv + ["--data-path", "corpus.jsonl"]), 1)
    with pytest.raises(ConfigError, match="missing"):
        validate_args(parse_args(argv + ["--data-path", "/nonexistent/prefix_text_document"]), 1)


def test_a_prefix_missing_preprocess_datas_suffix_names_the_existing_one(tmp_path, monkeypatch):
    # Megatron-LM users pass tools/preprocess_data.py's --output-prefix; it said only "missing 'data.idx'".
    import numpy as np

    from megatron_core.datasets import IndexedDatasetBuilder

    monkeypatch.chdir(tmp_path)
    with IndexedDatasetBuilder("data_text_document.bin", dtype=np.uint16) as builder:
        builder.add_document([1, 2, 3, 0], [4])
        builder.finalize("data_text_document.idx")
    argv = [a for a in _base() if a != "--mock-data"]
    with pytest.raises(ConfigError, match=r"^--data-path 'data': missing 'data.idx', 'data.bin'; did you mean "
                                          r"--data-path data_text_document\? \(found 'data_text_document': "):
        validate_args(parse_args(argv + ["--data-path", "data"]), 1)
    args = validate_args(parse_args(argv + ["--data-path", "data_text_document"]), 1)  # the suggestion works
    assert args.data_path == ["data_text_document"]


def test_per_split_data_path_errors(tmp_path):
    import numpy as np

    from megatron_core.datasets import IndexedDatasetBuilder

    prefix = str(tmp_path / "a_text_document")
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
        builder.add_document([1, 2, 3, 0], [4])
        builder.finalize(prefix + ".idx")
    argv = [a for a in _base() if a != "--mock-data"]
    with pytest.raises(ConfigError, match=r"^give --data-path \(split by --split\) or --train-data-path \(each split "
                                          r"its own data\), not both$"):
        validate_args(parse_args(argv + ["--data-path", prefix, "--train-data-path", prefix]), 1)
    validate_args(parse_args(argv + ["--train-data-path", prefix]), 1)  # no validation: skipped with a warning
    with pytest.raises(ConfigError, match=r"^--valid-data-path without --train-data-path: give --train-data-path "
                                          r"PREFIX for training$"):
        validate_args(parse_args(argv + ["--valid-data-path", prefix]), 1)
    missing = "/nowhere/x_text_document"
    with pytest.raises(ConfigError, match=rf"^--valid-data-path '{missing}': missing"):
        validate_args(parse_args(argv + ["--train-data-path", prefix, "--valid-data-path", missing]), 1)
    with pytest.raises(ConfigError, match=r"^--split 90,10,0 does not apply to --train-data-path \(each split is "
                                          r"every document of its own prefixes\); drop --split, or give --data-path "
                                          r"instead$"):
        validate_args(parse_args(argv + ["--train-data-path", prefix, "--eval-iters", "0", "--split", "90,10,0"]), 1)
    args = validate_args(parse_args(argv + ["--train-data-path", prefix, "--eval-iters", "0"]), 1)
    assert args.train_data_path == [prefix] and args.data_path is None


def test_data_args_files_give_the_data_paths(tmp_path):
    """Megatron-LM's --data-args-path FILE (the --data-path list, whitespace-separated, for blends too long for a
    command line) and --per-split-data-args-path FILE.json ({"train": ..., "valid": ..., "test": ...}, each a
    list or one string) (megatron/training/utils/common_utils.py: get_blend_and_blend_per_split). They were
    refused as Megatron-LM flags this trainer does not implement, with the advice 'drop it', which leaves no data."""
    import json

    import numpy as np

    from megatron_core.datasets import IndexedDatasetBuilder

    prefixes = [str(tmp_path / f"{name}_text_document") for name in "ab"]
    for prefix in prefixes:
        with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
            builder.add_document([1, 2, 3, 0], [4])
            builder.finalize(prefix + ".idx")
    argv = [a for a in _base() if a != "--mock-data"]
    blend = tmp_path / "blend.txt"
    blend.write_text(f"0.3 {prefixes[0]}\n0.7\t{prefixes[1]}\n")
    args = validate_args(parse_args(argv + ["--data-args-path", str(blend)]), 1)
    assert args.data_path == ["0.3", prefixes[0], "0.7", prefixes[1]]
    per_split = tmp_path / "splits.json"
    per_split.write_text(json.dumps({"train": f"0.3 {prefixes[0]} 0.7 {prefixes[1]}", "valid": [prefixes[1]],
                                     "test": None}))
    args = validate_args(parse_args(argv + ["--per-split-data-args-path", str(per_split)]), 1)
    assert (args.train_data_path, args.valid_data_path, args.test_data_path, args.data_path) == (
        ["0.3", prefixes[0], "0.7", prefixes[1]], [prefixes[1]], None, None)
    cases = [
        (["--data-args-path", str(blend), "--data-path", prefixes[0]],
         "give --data-path or --data-args-path, not both"),
        (["--per-split-data-args-path", str(per_split), "--valid-data-path", prefixes[0]],
         "give --train-data-path/--valid-data-path/--test-data-path or --per-split-data-args-path, not both"),
        (["--data-args-path", str(tmp_path / "none.txt")], f"--data-args-path {tmp_path / 'none.txt'}: cannot read it"),
        # the file's paths are judged as --data-path's, and the error names the file the user gave
        (["--data-args-path", str(blend), "--mock-data"], f"give only one of --data-args-path {blend} and --mock-data"),
        (["--per-split-data-args-path", str(per_split), "--mock-data"],
         f"give only one of --per-split-data-args-path {per_split} and --mock-data"),
    ]
    typo = tmp_path / "typo.txt"
    typo.write_text(prefixes[0] + "x")
    cases.append((["--data-args-path", str(typo)], f"--data-path '{prefixes[0]}x': missing"))
    cases.append((["--data-args-path", str(typo)], f" (read from --data-args-path {typo})"))
    for name, text, message in (("empty.txt", " \n", " holds no dataset prefix"),
                                ("bad.json", "[1]", ' is not a JSON object with "train", "valid" and "test" keys'),
                                ("typo.json", '{"train": "a", "validation": "b"}',
                                 ' has the key "validation"; the keys are "train", "valid" and "test"'),
                                ("type.json", '{"train": 3}', ': "train" is 3; give a list of prefixes'),
                                ("nothing.json", '{"train": [], "valid": null}', " holds no dataset prefix")):
        (tmp_path / name).write_text(text)
        flag = "--data-args-path" if name.endswith(".txt") else "--per-split-data-args-path"
        cases.append(([flag, str(tmp_path / name)], f"{flag} {tmp_path / name}{message}"))
    for extra, message in cases:
        with pytest.raises(ConfigError) as error:
            validate_args(parse_args(argv + extra), 1)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_flag_is_a_config_error():
    with pytest.raises(ConfigError, match="unrecognized arguments: --no-such-flag") as info:
        parse_args(["--no-such-flag"])
    assert "did you mean" not in str(info.value)


def test_misspelt_flag_names_the_closest_known_one():
    with pytest.raises(ConfigError) as info:
        parse_args(["--trian-iters", "5", "--micro-batch-sise=4"])
    assert "did you mean: --trian-iters -> --train-iters, --micro-batch-sise -> --micro-batch-size?" in str(info.value)


_NOT_IMPLEMENTED = "--save-retain-interval is a Megatron-LM flag that this trainer does not implement: drop it"


def _main_error(argv):
    import pretrain_gpt
    with pytest.raises(ConfigError) as info:
        pretrain_gpt.main(argv)
    return str(info.value)


def test_a_megatron_lm_flag_we_lack_is_named_as_such_not_guessed():
    """Megatron-LM's --save-retain-interval was answered "did you mean --save-interval?", a different flag."""
    assert _main_error(["--demo", "--save-retain-interval", "5"]) == (
        f"unrecognized arguments: --save-retain-interval 5; {_NOT_IMPLEMENTED} (see python pretrain_gpt.py --help)")
    assert _main_error(["--demo", "--save-retain-interval=5", "--non-persistent-save-interval", "5"]) == (
        "unrecognized arguments: --save-retain-interval=5 --non-persistent-save-interval 5; --save-retain-interval, "
        "--non-persistent-save-interval are Megatron-LM flags that this trainer does not implement: drop them "
        "(see python pretrain_gpt.py --help)")


def test_megatron_lms_own_retired_flags_name_their_replacement():
    """Megatron-LM's validate_args refuses --batch-size, --warmup, --model-parallel-size and
    --checkpoint-activations naming the flag to use instead. Here they were 'not implemented: drop it': dropping
    --model-parallel-size 8 runs at TP 1, dropping --checkpoint-activations runs without recompute."""
    assert _main_error(["--demo", "--model-parallel-size", "8", "--checkpoint-activations"]) == (
        "unrecognized arguments: --model-parallel-size 8 --checkpoint-activations; --model-parallel-size is an old "
        "Megatron-LM flag that Megatron-LM refuses too: use --tensor-model-parallel-size; --checkpoint-activations "
        "is an old Megatron-LM flag that Megatron-LM refuses too: use --recompute-activations, or "
        "--recompute-granularity and --recompute-method (see python pretrain_gpt.py --help)")
    for old, new in (("--batch-size", "--micro-batch-size"), ("--warmup", "--lr-warmup-fraction")):
        assert f"; {old} is an old Megatron-LM flag that Megatron-LM refuses too: use {new} (see" in _main_error(
            ["--demo", old, "1"])


def test_a_misspelt_megatron_lm_flag_we_lack_is_not_matched_to_one_of_ours():
    """--save-retain-intervall was answered "did you mean --save-interval?"; the flag meant is Megatron-LM's."""
    assert _main_error(["--demo", "--save-retain-intervall", "5"]) == (
        "unrecognized arguments: --save-retain-intervall 5; did you mean: --save-retain-intervall -> Megatron-LM's "
        "--save-retain-interval, not implemented here? (see python pretrain_gpt.py --help)")


def test_megatron_lm_flags_and_typos_together_are_one_line():
    """Run as a user runs it: one line on stderr, exit code 2, each unknown flag with its own advice (the typo
    its closest flag, as test_misspelt_flag_names_the_closest_known_one; the Megatron-LM flag no guess)."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(repo, "pretrain_gpt.py"), "--demo", "--trian-iters", "3",
                           "--save-retain-interval=5", "--no-such-flag"],
                          cwd=repo, env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: unrecognized arguments: --trian-iters 3 --save-retain-interval=5 --no-such-flag; {_NOT_IMPLEMENTED}; "
        "did you mean: --trian-iters -> --train-iters? (see python pretrain_gpt.py --help)"], proc.stderr


def test_the_megatron_lm_flag_list_ships_in_the_wheel(tmp_path):
    """megatron_lm_flags.txt is package data: a wheel built from pyproject.toml carries it, and the parser reads
    it through importlib.resources."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    from megatron_core.training.arguments import megatron_lm_flags
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(repo, name), source / name)
    shutil.copytree(os.path.join(repo, "megatron_core"), source / "megatron_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=240)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read("megatron_core/training/arguments/megatron_lm_flags.txt").decode()
    shipped = {line for line in text.splitlines() if line and not line.startswith("#")}
    assert shipped == megatron_lm_flags()
    assert {"--save-retain-interval", "--train-iters", "--tensor-model-parallel-size"} <= shipped
    assert all(flag.startswith("--") and " " not in flag for flag in shipped) and len(shipped) > 800


def test_train_samples_with_rampup_counts_small_batches():
    argv = [a for a in _base("--global-batch-size", "16", "--rampup-batch-size", "4", "4", "48")
            if a not in ("--train-iters", "10")] + ["--train-samples", "208"]
    args = validate_args(parse_args(argv), 1)
    # The batch grows by 4 every 48 / 3 = 16 samples: 4 x 4 (16 samples), 2 x 8 (32), 2 x 12 (56 >= 48),
    # then (208 - 56) // 16 = 9 full batches.
    assert args.train_iters == 4 + 2 + 2 + 9


@pytest.mark.parametrize("precision, in_fp32", [
    ([], False), (["--fp16"], False), (["--fp16", "--accumulate-allreduce-grads-in-fp32"], True),
    (["--bf16"], True), (["--bf16", "--grad-reduce-in-bf16"], False),
])
def test_gradients_are_reduced_in_fp32_by_megatrons_rule(precision, in_fp32):
    """Megatron-LM's arguments.py: bf16 gradients accumulate and reduce in fp32 unless --grad-reduce-in-bf16;
    fp16 and fp32 ones in the parameters' dtype unless --accumulate-allreduce-grads-in-fp32."""
    args = validate_args(parse_args(_base(*precision)), world_size=1)
    assert config_from_args(args).ddp.grad_reduce_in_fp32 is in_fp32


def test_a_negative_clip_grad_is_megatrons_no_clipping():
    """Megatron-LM's --clip-grad takes any float and clips only above 0.0; a negative value was refused here."""
    args = validate_args(parse_args(_base("--clip-grad", "-1")), world_size=1)
    assert config_from_args(args).optimizer.clip_grad == -1.0
    from megatron_core.training.arguments import build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert "--clip-grad CLIP_GRAD global gradient L2 norm to clip to (0 or negative: no clipping, as Megatron-LM)" \
        in help_text


def test_zero_and_offload_flags_default_to_the_library_configs_defaults():
    """A run that leaves the ZeRO-3 and offload flags out gets what a library user gets from the configs'
    defaults (--nvme-offload-buffer-count 2: double buffering, as OptimizerConfig's nvme_offload_buffer_count)."""
    from megatron_core.distributed import DistributedDataParallelConfig
    from megatron_core.optimizer import OptimizerConfig

    run = config_from_args(validate_args(parse_args(_base()), world_size=1))
    for name in ("optimizer_cpu_offload", "optimizer_offload_fraction", "nvme_offload_path",
                 "nvme_offload_buffer_count", "overlap_cpu_optimizer_d2h_h2d"):
        assert getattr(run.optimizer, name) == getattr(OptimizerConfig(), name), name
    for name in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "reshard_after_forward",
                 "offload_param"):
        assert getattr(run.ddp, name) == getattr(DistributedDataParallelConfig(), name), name


@pytest.mark.parametrize("split,message", [
    ("90,8,2,1", "--split '90,8,2,1' must have one to three comma-separated weights, e.g. 949,50,1"),
    ("ninety,10", "--split 'ninety,10' has a non-numeric weight; use e.g. 949,50,1"),
    ("0,0,0", "--split '0,0,0' needs non-negative weights with a positive sum"),
])
def test_a_malformed_split_is_a_config_error_before_the_run_starts(split, message):
    """A bad --split was found only when the datasets were built, after the model: a plain ValueError, which
    pretrain_gpt.py reports on every rank as a library error with '(set MCORE_TRACEBACK=1 for the traceback)'."""
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--data-path", "prefix", "--split", split,
            "--vocab-size", "100"]
    with pytest.raises(ConfigError) as info:
        validate_args(parse_args(argv), world_size=1)
    assert str(info.value) == message


def test_help_shows_every_default_including_zero():
    """docs/training.md: "--help shows every default". A default of 0 or 0.0 (--min-lr, --lr-warmup-iters,
    --manual-gc-interval, ...) is a default worth showing; only None, False (store_true flags) and [] are not
    (0 == False in Python, so a membership test against False dropped them)."""
    import argparse

    from megatron_core.training.arguments import build_parser

    parser = build_parser()
    text = parser.format_help()
    assert "learning rate at the end of the decay (default: 0.0)" in " ".join(text.split())
    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0
                or action.default is None or action.default is False or action.default == []):
            continue
        assert "(default:" in action.help, (action.option_strings[0], action.default, action.help)


@pytest.mark.parametrize("split", ["'99,1,0'", '"99,1,0"', "'99/1/0'", "99/1/0", " '99, 1, 0' "])
def test_split_in_quotes_or_with_slashes_reads_as_megatron_lm_reads_it(split):
    """Megatron-LM's Llama 3 example (examples/llama/train_llama3_8b_h100_fp8.sh) passes --split "'99,1,0'": the
    quotes reach the value. Megatron-LM's parse_and_normalize_split reads it; here it was 'a non-numeric weight'."""
    from megatron_core.datasets import parse_split

    args = validate_args(parse_args(_base("--split", split)), world_size=1)
    assert parse_split(args.split) == pytest.approx([0.99, 0.01, 0.0])


@pytest.mark.parametrize("split,message", [
    ("'99,1,0", "--split \"'99,1,0\" has a non-numeric weight; use e.g. 949,50,1"),
    ("'99,1,0\"", "--split '\\'99,1,0\"' has a non-numeric weight; use e.g. 949,50,1"),
    ("99;1;0", "--split '99;1;0' has a non-numeric weight; use e.g. 949,50,1"),
    # quotes around nothing: no weight at all, not a non-numeric one (the unquoting takes a value of two quotes)
    ("''", "--split \"''\" must have one to three comma-separated weights, e.g. 949,50,1"),
])
def test_split_in_other_forms_is_one_line_naming_split(split, message):
    with pytest.raises(ConfigError) as info:
        validate_args(parse_args(_base("--split", split)), world_size=1)
    assert str(info.value) == message


def test_sequence_parallel_without_tensor_parallelism_warns_in_one_line(capsys, monkeypatch):
    """Megatron-LM warns "Disabling sequence parallelism because tensor model parallelism is disabled"; here the
    flag was dropped silently. One line on stderr (rank 0), and the run goes on without it."""
    monkeypatch.delenv("RANK", raising=False)
    args = validate_args(parse_args(_base("--sequence-parallel")), world_size=1)
    assert not args.sequence_parallel
    assert capsys.readouterr().err.splitlines() == [
        "warning: Disabling sequence parallelism because tensor model parallelism is disabled (--sequence-parallel "
        "with --tensor-model-parallel-size 1); drop --sequence-parallel or use --tensor-model-parallel-size 2 or more"]
    validate_args(parse_args(_base()), world_size=1)
    validate_args(parse_args(_base("--sequence-parallel", "--tensor-model-parallel-size", "2")), world_size=2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags, kind", [
    (["--position-embedding-type", "rope", "--no-position-embedding"], "rope"),
    (["--no-position-embedding", "--position-embedding-type", "rope"], "rope"),
    (["--no-position-embedding", "--use-rotary-position-embeddings"], "rope"),
    (["--use-rotary-position-embeddings"], "rope"),
    (["--no-position-embedding"], "none"),
    ([], "learned_absolute"),
])
def test_no_position_embedding_beside_rope_keeps_rope(flags, kind):
    """Megatron-LM's --no-position-embedding drops the learned absolute position table (add_position_embedding
    False); its validate_args allows it only beside RoPE, where it changes nothing, and Llama scripts pass both
    (examples/post_training/modelopt/conf/meta-llama/*.sh; `--position-embedding-type rope --no-position-embedding`
    in Llama 2 scripts). Here it set the type to none after --position-embedding-type rope: the model silently
    trained with no position information at all."""
    args = validate_args(parse_args(_base(*flags)), world_size=1)
    assert args.position_embedding_type == kind
    assert config_from_args(args).model.transformer.position_embedding_type == kind


