"""tools/checkpoint/convert.py: Hugging Face <-> Megatron legacy layout at any TP/PP size.

A converted checkpoint loads strictly into GPTModel at its TP size and reproduces the Hugging Face
logits; export, import and export again gives byte-identical files that ``from_pretrained`` loads
to the original weights; bad inputs fail with messages naming the path and flag.
"""
import filecmp
import os

import pytest
import torch
import torch.distributed as dist
from equivalence import assert_rel_close
from harness import run_distributed

from megatron_core import parallel_state
from megatron_core.checkpoint.convert import main as convert
from megatron_core.checkpoint.sharding import pad_vocab_rows, partition_of
from megatron_core.models.gpt import build_gpt_model_chunks
from megatron_core.transformer.config import TransformerConfig
from tests.hf_testing import tiny_hf_gpt2, tiny_hf_llama

SEQ = 16
MODELS = {"gpt2": lambda: tiny_hf_gpt2(vocab_size=250),  # padded to 256: the padding must not leak out
          "llama": lambda: tiny_hf_llama(vocab_size=256, layers=4)}


def _ids(vocab):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _cli(loader, saver, src, dst, *extra):
    return convert(["--model-type", "GPT", "--loader", loader, "--saver", saver, "--load-dir", str(src),
                    "--save-dir", str(dst), *map(str, extra)])


def _load_and_run(ckpt_dir):
    """Build the model chunks this rank holds from the checkpoint's own config, load them strictly,
    run one batch through the pipeline by hand; the last stage returns its logits shard."""
    iteration = int(open(os.path.join(ckpt_dir, "latest_checkpointed_iteration.txt")).read())
    head = torch.load(os.path.join(ckpt_dir, f"iter_{iteration:07d}", sorted(os.listdir(
        os.path.join(ckpt_dir, f"iter_{iteration:07d}")))[0], "model_optim_rng.pt"), weights_only=True)
    info, config = head["model_info"], TransformerConfig.from_dict(head["config"])
    pp = info["pipeline_model_parallel_size"]
    ps = parallel_state.initialize_model_parallel(info["tensor_model_parallel_size"], pp,
                                                  info["virtual_pipeline_model_parallel_size"])
    rank_dir = f"mp_rank_{ps.tp_rank:02d}" + (f"_{ps.pp_rank:03d}" if pp > 1 else "")
    state = torch.load(os.path.join(ckpt_dir, f"iter_{iteration:07d}", rank_dir, "model_optim_rng.pt"),
                       weights_only=True)
    chunks = build_gpt_model_chunks(config, info["vocab_size"], info["max_position_embeddings"], ps,
                                    make_vocab_size_divisible_by=info["make_vocab_size_divisible_by"])
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        chunk.load_state_dict(state[key], strict=True)
        chunk.eval()
    ids, hidden, logits = _ids(info["vocab_size"]), None, None
    for chunk in chunks:
        if not chunk.pre_process:
            hidden = torch.empty(SEQ, 2, config.hidden_size)
            dist.recv(hidden, src=ps.prev_pipeline_rank)
            chunk.set_input_tensor(hidden)
        out = chunk(ids).detach()
        if chunk.post_process:
            logits = out.contiguous()
        else:
            dist.send(out.contiguous(), dst=ps.next_pipeline_rank)
    attrs = {n: (getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None,
                 getattr(p, "partition_stride", None)) for c in chunks for n, p in c.named_parameters()}
    return logits, info, attrs, config


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_to_core_to_hf(family, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = MODELS[family]()
    hf.save_pretrained(tmp_path / "hf")
    vocab = hf.config.vocab_size
    ref_logits = hf(_ids(vocab)).logits.detach()

    # Import at TP=2 and load it into the model, strictly, on each TP rank.
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "tp2", "--target-tensor-parallel-size", 2) == 0
    results = run_distributed(_load_and_run, 2, str(tmp_path / "tp2"), timeout=90)
    logits = torch.cat([r[0] for r in results], dim=-1)[..., :vocab]
    assert_rel_close(logits, ref_logits, what=f"{family} TP=2 logits")
    info, attrs, config = results[0][1], results[0][2], results[0][3]
    assert info["padded_vocab_size"] == 256 and info["tensor_model_parallel_size"] == 2
    for name, (dim, stride) in attrs.items():  # the converter's split table matches the layers' attributes
        expected = partition_of(name, config)
        assert (dim, stride if dim is not None else None) == \
            ((expected[0], expected[1]) if expected else (None, None)), name

    # Import as pipeline stages (Llama: 2 virtual stages per rank) and run the pipeline by hand.
    stages = ["--target-pipeline-parallel-size", 2] + (["--target-virtual-pipeline-parallel-size", 2]
                                                       if family == "llama" else [])
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "stages", *stages) == 0
    last = run_distributed(_load_and_run, 2, str(tmp_path / "stages"), timeout=90)[-1][0]
    assert_rel_close(last[..., :vocab], ref_logits, what=f"{family} pipeline-stage logits")

    # Re-shard to TP=2 x PP=2, export, import that export, export again: identical bytes.
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "pp2", "--target-tensor-parallel-size", 2,
                "--target-pipeline-parallel-size", 2) == 0
    assert sorted(os.listdir(tmp_path / "pp2" / "iter_0000001")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert _cli("core", "hf", tmp_path / "pp2", tmp_path / "x1") == 0
    assert _cli("hf", "core", tmp_path / "x1", tmp_path / "again", "--target-tensor-parallel-size", 1) == 0
    assert _cli("core", "hf", tmp_path / "again", tmp_path / "x2") == 0
    for name in ("config.json", "model.safetensors"):
        assert filecmp.cmp(tmp_path / "x1" / name, tmp_path / "x2" / name, shallow=False), name

    # The export is what transformers loads: the original weights, bit for bit.
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "x1").float().eval()
    assert type(back) is type(hf)
    original = hf.state_dict()
    for name, value in back.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_errors_name_the_path_and_flag(tmp_path, capsys):
    assert _cli("hf", "core", tmp_path / "missing", tmp_path / "out") == 2
    assert f"--load-dir {tmp_path / 'missing'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _cli("hf", "core", tmp_path / "empty", tmp_path / "out") == 2
    assert "has no config.json" in capsys.readouterr().err
    assert _cli("core", "hf", tmp_path / "empty", tmp_path / "out") == 2
    assert "latest_checkpointed_iteration.txt" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")  # it said "--load-dir .../afile does not exist"
    assert _cli("core", "hf", tmp_path / "afile", tmp_path / "out") == 2
    assert f"--load-dir {tmp_path / 'afile'} is a file, not a checkpoint directory" in capsys.readouterr().err
    from transformers import BertConfig
    BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    assert _cli("hf", "core", tmp_path / "bert", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model_type 'bert'" in err and "GPT2LMHeadModel" in err
    tiny_hf_gpt2().save_pretrained(tmp_path / "gpt2")
    assert _cli("hf", "core", tmp_path / "gpt2", tmp_path / "out", "--target-tensor-parallel-size", 3) == 2
    err = capsys.readouterr().err
    # The converter's own flag first (a user of convert.py never typed --tensor-model-parallel-size).
    assert "--target-tensor-parallel-size 3 / --target-pipeline-parallel-size 1 do not fit" in err, err
    assert "not divisible by --tensor-model-parallel-size (3)" in err
    assert _cli("nemo", "core", tmp_path / "gpt2", tmp_path / "out") == 2
    assert "convert.py: error: --loader 'nemo' is not supported" in capsys.readouterr().err
    # Converting in place (the same directory by another spelling) would overwrite the source.
    before = sorted(p.name for p in (tmp_path / "gpt2").iterdir())
    assert _cli("hf", "hf", tmp_path / "gpt2", f"{tmp_path}/./gpt2/") == 2
    assert "is --load-dir: the converted checkpoint would replace the one it is read from" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "gpt2").iterdir()) == before


@pytest.mark.parametrize("family,field,value,message", [
    ("gpt2", "n_embd", 128, "'transformer.h.0.attn.c_attn.bias' has shape (192,) but config.json gives (384,)"),
    ("gpt2", "vocab_size", 300, "'transformer.wte.weight' has shape (256, 64) but config.json gives (300, 64)"),
    ("gpt2", "n_layer", 1, "'transformer.h.1.attn.c_attn.bias' has no place in a GPT2LMHeadModel with this config.json "
                           "(1 layers)"),
    ("llama", "num_key_value_heads", 4, "'model.layers.0.self_attn.k_proj.weight' has shape (32, 64) but "
                                        "config.json gives (64, 64)")])
def test_a_config_json_that_does_not_describe_the_weights_is_refused(family, field, value, message, tmp_path,
                                                                       capsys):
    """Each converted without a word (a checkpoint of the wrong shape) or ended in a reshape traceback."""
    import json
    src = tmp_path / "hf"
    (tiny_hf_gpt2() if family == "gpt2" else tiny_hf_llama()).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, field: value}))
    assert _cli("hf", "core", src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"convert.py: error: --load-dir {src}: weight {message}; config.json does not describe these weights" \
        in err, err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_save_dir_names_the_flag(tmp_path, capsys):
    """It was the bare '[Errno 2] No such file or directory: '/proc/nope'' (found by breakit2)."""
    tiny_hf_gpt2().save_pretrained(tmp_path / "hf")
    for saver in ("core", "hf"):
        assert _cli("hf", saver, tmp_path / "hf", "/proc/nope") == 2
        err = capsys.readouterr().err  # after the core saver's progress bar
        assert err.splitlines()[-1].startswith("convert.py: error: --save-dir /proc/nope cannot be written (")
        assert "Traceback" not in err


def test_a_save_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    tiny_hf_gpt2().save_pretrained(tmp_path / "hf")
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    for saver in ("core", "hf"):
        assert _cli("hf", saver, tmp_path / "hf", tmp_path / "file") == 2  # was FileExistsError's traceback
        assert capsys.readouterr().err == (f"convert.py: error: --save-dir {tmp_path / 'file'} is a file; give a "
                                           f"directory (it is created if missing)\n")
        # Under the file: it was NotADirectoryError's traceback from os.makedirs, after the load.
        assert _cli("hf", saver, tmp_path / "hf", tmp_path / "file" / "out" / "x") == 2
        assert capsys.readouterr().err == (f"convert.py: error: --save-dir {tmp_path / 'file' / 'out' / 'x'} is under "
                                           f"the file {tmp_path / 'file'}, so it cannot be created; give a directory "
                                           f"elsewhere\n")


def test_a_resharded_training_checkpoint_continues_the_data_and_the_schedule(tmp_path):
    """A legacy PP 2 checkpoint re-sharded to TP 1 (the documented way to change a legacy layout) kept its
    iteration but lost the consumed samples and the schedule: the resume re-read the data from sample 0 at
    the warm-up learning rate. SGD without momentum has no optimizer state, so the continuation is exact."""
    from test_pretrain import _logged, _train
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6", "--lr", "0.1",
            "--lr-decay-style", "cosine", "--min-lr", "0.01", "--optimizer", "sgd", "--sgd-momentum", "0",
            "--mock-data", "--vocab-size", "255", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "7", "--ckpt-format", "torch"]
    ckpt = str(tmp_path / "ckpt")
    whole = _logged(run_distributed(_train, 2, args + ["--pipeline-model-parallel-size", "2", "--save", ckpt,
                                                       "--save-interval", "3"], timeout=240))
    assert _cli("core", "core", ckpt, tmp_path / "tp1", "--load-iteration", 3) == 0
    # A re-shard carries no RNG states (save_flags records so): the resume must say --no-load-rng.
    rest = _logged(run_distributed(_train, 1, args + ["--load", str(tmp_path / "tp1"), "--no-load-rng"], timeout=240))
    assert rest.loaded_iteration == 3 and rest.consumed_train_samples == whole.consumed_train_samples == 24
    assert_rel_close(torch.tensor(rest.losses), torch.tensor(whole.losses[3:]), what="losses after the resume")


def test_megatron_converter_flags_are_accepted(tmp_path, capsys):
    """A Megatron-LM convert command carries --megatron-path, --max-queue-size, --no-checking, the
    transformer-impl flags and --true-vocab-size: accepted, the last checked against the checkpoint."""
    model = tiny_hf_gpt2()
    model.save_pretrained(tmp_path / "gpt2")
    vocab = model.config.vocab_size
    megatron = ["--megatron-path", "/opt/Megatron-LM", "--max-queue-size", 50, "--no-checking",
                "--loader-transformer-impl", "transformer_engine", "--saver-transformer-impl", "local"]
    assert _cli("hf", "core", tmp_path / "gpt2", tmp_path / "core", *megatron) == 0
    assert _cli("core", "hf", tmp_path / "core", tmp_path / "hf", "--true-vocab-size", vocab, *megatron) == 0
    capsys.readouterr()
    assert _cli("core", "hf", tmp_path / "core", tmp_path / "hf2", "--true-vocab-size", vocab + 1) == 2
    assert f"--true-vocab-size {vocab + 1} differs from the vocabulary size {vocab}" in capsys.readouterr().err


def test_virtual_stages_need_a_pipeline_and_one_is_none(tmp_path, capsys):
    """Virtual stages interleave pipeline ranks: 2 of them at PP 1 is refused in one line (it wrote a
    checkpoint no run can load: training refuses virtual stages at PP 1). One virtual stage per rank is
    the plain layout (training builds it without virtual stages): written as such, not as model0 with
    virtual size 1, which no run's layout matched. A --load-iteration that is not there names the saved ones."""
    tiny_hf_llama(vocab_size=256, layers=4).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "v2", "--target-virtual-pipeline-parallel-size", 2) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--target-virtual-pipeline-parallel-size 2 needs --target-pipeline-parallel-size" \
        in err, err
    assert not os.path.exists(tmp_path / "v2" / "iter_0000001")
    # An uneven split names the converter's sizes, not training's flags for uneven first/last stages.
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "p3", "--target-pipeline-parallel-size", 3) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(
        "--target-pipeline-parallel-size 3 do not fit this model: its 4 layers do not split evenly over 3 pipeline "
        "chunks; give sizes whose chunk count (pipeline x virtual) divides 4"), err
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "v1", "--target-virtual-pipeline-parallel-size", 1,
                "--target-pipeline-parallel-size", 2) == 0
    head = torch.load(tmp_path / "v1" / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=True)
    assert head["model_info"]["virtual_pipeline_model_parallel_size"] is None and "model" in head, sorted(head)
    capsys.readouterr()
    assert _cli("core", "core", tmp_path / "v1", tmp_path / "out", "--load-iteration", 7) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert.py: error: --load-iteration 7: ") and "saved in --load-dir" in err, err
    assert err.rstrip().endswith(": 1)"), err


@pytest.mark.parametrize("flag,value", [("--target-tensor-parallel-size", 0), ("--target-pipeline-parallel-size", -1),
                                        ("--make-vocab-size-divisible-by", 0), ("--iteration", 0)])
def test_sizes_below_one_are_a_one_line_error(flag, value, tmp_path, capsys):
    """Each was a ZeroDivisionError traceback (or a checkpoint of iteration 0, which no tracker names)."""
    tiny_hf_gpt2().save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "out", flag, value) == 2
    assert capsys.readouterr().err == f"convert.py: error: {flag} {value}: give an integer of 1 or more\n"
    assert not (tmp_path / "out").exists()


def test_megatron_llama_mistral_command_converts_an_hf_llama(tmp_path, capsys):
    """Megatron-LM's docs/llama_mistral.md command (``--loader llama_mistral --checkpoint-type hf
    --model-size ... --bf16 --tokenizer-model ...``) was refused ('llama_mistral' is not supported, then
    the unknown flags). It reads the HF directory as ``--loader hf``; ``--bf16`` writes bf16 weights, as
    that loader's ``params_dtype``; the tokenizer type follows from ``--tokenizer-model`` as there."""
    from tests.test_text_generation_cli import _save_tokenizer_json

    hf = tiny_hf_llama(vocab_size=300)
    hf.save_pretrained(tmp_path / "hf")
    _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    capsys.readouterr()
    assert convert(["--bf16", "--model-type", "GPT", "--loader", "llama_mistral", "--saver", "mcore",
                    "--target-tensor-parallel-size", "2", "--checkpoint-type", "hf", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", str(tmp_path / "core"), "--tokenizer-model", str(tmp_path / "hf"),
                    "--model-size", "llama3"]) == 0
    assert "no tokenizer written" not in capsys.readouterr().err
    shard = torch.load(tmp_path / "core" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    assert shard["model_info"]["tokenizer"]["type"] == "HuggingFaceTokenizer", shard["model_info"]
    dtypes = {v.dtype for v in shard["model"].values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert dtypes == {torch.bfloat16}, dtypes
    assert _cli("core", "hf", tmp_path / "core", tmp_path / "back") == 0
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    for name, value in hf.state_dict().items():
        assert torch.equal(back[name].float(), value.bfloat16().float()), name
    capsys.readouterr()
    assert convert(["--model-type", "GPT", "--loader", "llama_mistral", "--saver", "core", "--checkpoint-type", "meta",
                    "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "meta")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert.py: error: --checkpoint-type meta") and "hf" in err, err
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--bf16", "--fp16",
                    "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "both")]) == 2
    assert "--bf16 and --fp16" in capsys.readouterr().err


def test_the_no_tokenizer_note_only_where_a_tokenizer_is_lost(tmp_path, capsys):
    """Re-sharding a legacy checkpoint (a format whose training runs record no tokenizer) printed "no
    tokenizer written" every time. The note stays where a tokenizer is lost: a recorded one that is gone,
    and a Hugging Face directory written without one; each says which."""
    import shutil

    from tests.test_text_generation_cli import _save_tokenizer_json
    # 512 tokens are their own padded size at TP 1 and 2, so no padding note (the test above), and
    # hold the 300-token tokenizer written below
    tiny_hf_gpt2(vocab_size=512).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "legacy") == 0
    err = capsys.readouterr().err
    assert err == (f"convert.py: note: no tokenizer written to {tmp_path / 'legacy'} ({tmp_path / 'hf'} holds no "
                   f"tokenizer files); add one with --tokenizer-type TYPE --tokenizer-model FILE (or "
                   f"--vocab-file/--merge-file)\n"), err
    assert _cli("core", "core", tmp_path / "legacy", tmp_path / "tp2", "--target-tensor-parallel-size", 2) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("converted core:"), captured
    assert _cli("core", "hf", tmp_path / "tp2", tmp_path / "hf_out") == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"(the legacy checkpoint {tmp_path / 'tp2'} records no tokenizer)" in err, err
    # A tokenizer the checkpoint records, then lost: said on a re-shard too.
    _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "with_tok") == 0
    assert capsys.readouterr().err == ""
    shutil.rmtree(tmp_path / "with_tok" / "tokenizer")
    assert _cli("core", "core", tmp_path / "with_tok", tmp_path / "resharded", "--target-tensor-parallel-size", 2) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"(its tokenizer directory {tmp_path / 'with_tok' / 'tokenizer'} is gone)" \
        in err, err


def test_a_null_tokenizer_run_resharded_from_torch_dist_says_nothing_of_a_tokenizer(tmp_path, capsys):
    """A torch_dist checkpoint records its run's tokenizer flags; a NullTokenizer run has no text to lose."""
    from test_pretrain import _train
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr", "0.1",
            "--mock-data", "--vocab-size", "255", "--eval-iters", "0", "--num-workers", "0",
            "--save", str(tmp_path / "dist"), "--save-interval", "1"]
    run_distributed(_train, 1, args, timeout=120)
    capsys.readouterr()
    assert _cli("core", "core", tmp_path / "dist", tmp_path / "legacy") == 0
    # Only the note of the flags its resume needs (a torch_dist source's optimizer is not carried).
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"convert.py: note: {tmp_path / 'legacy'} holds no RNG or "
                                                    f"optimizer states"), err
    assert _cli("core", "hf", tmp_path / "dist", tmp_path / "hf") == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"(the run that saved {tmp_path / 'dist'} used NullTokenizer: ids without " \
        f"text)" in err, err


def _padded_rows(ckpt_dir, iteration, rank_dir):
    head = torch.load(os.path.join(ckpt_dir, f"iter_{iteration:07d}", rank_dir, "model_optim_rng.pt"),
                      weights_only=True)
    return head["model_info"]["padded_vocab_size"], head["model_info"]["make_vocab_size_divisible_by"]


def test_a_reshard_keeps_the_vocabulary_padding_multiple_the_run_was_saved_with(tmp_path):
    """A run with --make-vocab-size-divisible-by 32 (63 tokens: 64 rows at TP 1 and 2) re-sharded without
    the flag was padded to 128 x TP rows, so resuming it with the run's own flags was refused
    ('padded_vocab_size: checkpoint 256 vs run 64'). Megatron-LM's converter keeps the source's value
    (loader ``md.make_vocab_size_divisible_by``, passed on by the saver); the flag still overrides it."""
    from test_pretrain import _logged, _train
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "0.1",
            "--mock-data", "--vocab-size", "63", "--make-vocab-size-divisible-by", "32", "--eval-iters", "0",
            "--num-workers", "0", "--hidden-dropout", "0", "--attention-dropout", "0"]
    dist_dir, tp2, tp1 = tmp_path / "dist", tmp_path / "tp2", tmp_path / "tp1"
    run_distributed(_train, 1, args + ["--save", str(dist_dir), "--exit-interval", "2"], timeout=120)
    assert _cli("core", "core", dist_dir, tp2, "--target-tensor-parallel-size", 2) == 0  # torch_dist source
    assert _padded_rows(tp2, 2, "mp_rank_01") == (64, 32)
    assert _cli("core", "core", tp2, tp1) == 0  # legacy source
    assert _padded_rows(tp1, 2, "mp_rank_00") == (64, 32)
    # A torch_dist source's optimizer is not carried (nor its schedule), and no re-shard carries RNG states:
    # the re-shard records so, and its resume must skip them.
    state = torch.load(tp2 / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    assert state["save_flags"] == {"optimizer": False, "rng": False, "written_by": "tools/checkpoint/convert.py"}
    assert "opt_param_scheduler" not in state and state["consumed_train_samples"] == 8
    rest = _logged(run_distributed(_train, 2, args + ["--tensor-model-parallel-size", "2", "--load", str(tp2),
                                                      "--no-load-optim", "--no-load-rng"], timeout=120))
    assert rest.loaded_iteration == 2 and rest.iteration == 3
    assert _cli("core", "core", tp2, tmp_path / "flag", "--make-vocab-size-divisible-by", 128) == 0
    assert _padded_rows(tmp_path / "flag", 2, "mp_rank_00") == (128, 128)


def test_vocabulary_padding_rows_fill_to_the_padded_size_whatever_the_hidden_size():
    """pad_vocab_rows (Megatron-LM's saver_mcore.py rule): one missing row (a 255-token vocabulary padded to
    256) is a copy of the last row, a hidden size above the padded vocabulary is no error, and a table longer
    than the padded size is refused rather than cut."""
    table = torch.arange(5 * 16, dtype=torch.float32).reshape(5, 16)  # 5 tokens, h 16 > 6 and 8 rows
    assert torch.equal(pad_vocab_rows(table, 6), torch.cat([table, table[-1:]]))
    source_padding = torch.full((2, 16), -1.0)
    assert torch.equal(pad_vocab_rows(table, 8, source_padding),
                       torch.cat([table, source_padding, source_padding[-1:]]))
    with pytest.raises(ValueError, match="vocabulary table has 5 rows, more than the padded size 4"):
        pad_vocab_rows(table, 4)


def test_padding_rows_added_by_copy_are_noted(tmp_path, capsys):
    """Rows a save adds to the vocabulary tables are copies of the last row (Megatron-LM's converter rule); their
    logits join the softmax, so the converter says so on the console, and only then: a Hugging Face model has
    none of the padding, a re-shard to the same padded size keeps the saved rows."""
    tiny_hf_gpt2(vocab_size=250).save_pretrained(tmp_path / "hf")
    assert _cli("hf", "core", tmp_path / "hf", tmp_path / "tp1") == 0
    assert "grow from 250 to 256 rows (--make-vocab-size-divisible-by 128 x TP 1)" in capsys.readouterr().err
    assert _cli("core", "core", tmp_path / "tp1", tmp_path / "tp2", "--target-tensor-parallel-size", 2) == 0
    assert "vocabulary tables grow" not in capsys.readouterr().err
    assert _cli("core", "core", tmp_path / "tp2", tmp_path / "tp4", "--target-tensor-parallel-size", 4) == 0
    assert "grow from 256 to 512 rows (--make-vocab-size-divisible-by 128 x TP 4)" in capsys.readouterr().err
    tiny_hf_llama(vocab_size=256, layers=2).save_pretrained(tmp_path / "llama")
    assert _cli("hf", "core", tmp_path / "llama", tmp_path / "llama_core") == 0
    assert "vocabulary tables grow" not in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path, capsys):
    """--tokenizer-model of a 300-token tokenizer with a 256-token model was written beside it; the error came at
    generation ('prompt token id 280 is outside the model's vocabulary') or as a --vocab-size to raise in training."""
    from tests.test_text_generation_cli import _save_tokenizer_json

    tiny_hf_gpt2(vocab_size=256).save_pretrained(tmp_path / "hf")
    _save_tokenizer_json(tmp_path / "tokenizer.json")
    capsys.readouterr()
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "tokenizer.json")]
    for saver in ("core", "hf"):
        assert _cli("hf", saver, tmp_path / "hf", tmp_path / f"to_{saver}", *flags) == 2
        assert capsys.readouterr().err == (
            f"convert.py: error: the tokenizer (--tokenizer-model {tmp_path / 'tokenizer.json'}) has 300 tokens but "
            f"the model in --load-dir {tmp_path / 'hf'} has a vocabulary of 256: ids from 256 on would have no "
            f"embedding row; give the tokenizer the model was trained with\n")
        assert not os.path.exists(tmp_path / f"to_{saver}")
