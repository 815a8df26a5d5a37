"""tools/run_text_generation.py end to end: a legacy checkpoint saved at TP2 x PP2 read by one process,
a Hugging Face directory under a real torchrun TP=2 launch, and text prompts through a saved tokenizer;
greedy tokens equal Hugging Face ``generate`` on the same weights."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_core.checkpoint import convert
from tests.hf_testing import tiny_hf_gpt2, tiny_hf_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "run_text_generation.py")
PROMPTS = [[5, 17, 99], [200, 3, 41, 7, 8]]


def _hf_greedy(hf_model, prompt, new_tokens, eos=None):
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0].tolist()


def _run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(tmp_path / "out.json")), proc


def _token_flags(prompts):
    return [flag for p in prompts for flag in ("--prompt-tokens", ",".join(map(str, p)))]


def test_legacy_checkpoint_any_layout_and_torchrun_tp2(tmp_path):
    hf_model = tiny_hf_llama(vocab_size=250)
    hf_model.save_pretrained(tmp_path / "hf")
    assert convert.main(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir",
                         str(tmp_path / "hf"), "--save-dir", str(tmp_path / "ckpt"),
                         "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]) == 0
    expected = [_hf_greedy(hf_model, p, 8) for p in PROMPTS]
    common = [*_token_flags(PROMPTS), "--tokens-to-generate", "8", "--top_k", "1",
              "--output", str(tmp_path / "out.json")]
    out, _ = _run([sys.executable, TOOL, "--load", str(tmp_path / "ckpt"), *common], tmp_path)
    assert out["tokens"] == expected, "legacy TP2xPP2 checkpoint at TP1: greedy differs from HF generate"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TOOL]
    out, _ = _run([*launch, "--load", str(tmp_path / "hf"), "--tensor-model-parallel-size", "2", *common], tmp_path)
    assert out["tokens"] == expected, "HF directory at TP2 (torchrun): greedy differs from HF generate"


def _save_tokenizer_json(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "the quick brown fox jumps over the lazy dog " * 50],
                            trainer=trainer)
    tok.save(str(path))
    return tok


def test_text_prompts_with_saved_tokenizer(tmp_path):
    hf_model = tiny_hf_gpt2(vocab_size=300)
    hf_model.save_pretrained(tmp_path / "hf")
    tok = _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    eod = tok.token_to_id("<|endoftext|>")
    prompts = ["def f(x):", "the quick brown"]
    cmd = [sys.executable, TOOL, "--load", str(tmp_path / "hf"), "--prompt", prompts[0], "--prompt", prompts[1],
           "--tokens-to-generate", "6", "--top_k", "1", "--output", str(tmp_path / "out.json")]
    out, proc = _run(cmd, tmp_path)
    for i, prompt in enumerate(prompts):
        expected = _hf_greedy(hf_model, tok.encode(prompt).ids, 6, eod)
        assert out["tokens"][i] == expected
        assert out["text"][i] == tok.decode(expected, skip_special_tokens=False)
        assert out["text"][i].startswith(prompt) and f"[{i}] {prompt}" in proc.stdout


def test_bad_flags_are_one_line_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, TOOL, "--load", str(tmp_path / "missing"), "--prompt-tokens", "1"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--load" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_a_prompt_token_outside_the_vocabulary_is_a_one_line_error(tmp_path):
    """--prompt-tokens 1,2,9999 against a 256-token model: exit 2 and one line, not the embedding's traceback."""
    tiny_hf_gpt2().save_pretrained(tmp_path / "hf")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, TOOL, "--load", str(tmp_path / "hf"), "--prompt-tokens", "1,2,9999"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == ["run_text_generation.py: error: prompt token id 9999 is outside the model's vocabulary "
                     "[0, 256); give ids the model's tokenizer produces"], proc.stderr[-3000:]


def test_sampling_flags_default_to_megatrons_whole_vocabulary_sampling():
    from megatron_core.inference import SamplingParams
    from megatron_core.inference.text_generation_cli import build_parser, sampling_from_args

    args = build_parser().parse_args(["--load", "x", "--prompt", "hi"])
    assert sampling_from_args(args) == SamplingParams(temperature=1.0, top_k=0, top_p=0.0, seed=1234)
    args = build_parser().parse_args(["--load", "x", "--prompt", "hi", "--top_k", "5", "--temperature", "0.5",
                                      "--seed", "3"])
    assert sampling_from_args(args) == SamplingParams(temperature=0.5, top_k=5, top_p=0.0, seed=3)


def _report_after_initialization():
    from megatron_core import parallel_state
    from megatron_core.errors import ConfigError
    from megatron_core.inference.text_generation_cli import report_error
    from megatron_core.training.initialize import initialize_distributed

    context = initialize_distributed("gloo", timeout_minutes=1)
    parallel_state.initialize_model_parallel(1)
    before = parallel_state.model_parallel_is_initialized()
    report_error("run_text_generation.py", ConfigError("--load x: bad"), context)
    return before, parallel_state.model_parallel_is_initialized()


def test_an_error_after_initialization_tears_the_model_parallel_groups_down(capfd):
    from harness import run_distributed

    assert run_distributed(_report_after_initialization, 1, timeout=60) == [(True, False)]
    assert "run_text_generation.py: error: --load x: bad" in capfd.readouterr().err


def test_an_output_path_that_cannot_be_written_is_a_one_line_error_before_loading(tmp_path, capsys):
    """--output DIR and --output in a missing directory ended, after loading and generating, in
    IsADirectoryError's / FileNotFoundError's traceback."""
    from megatron_core.inference.text_generation_cli import main

    tiny_hf_gpt2().save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    for output, message in ((tmp_path, f"--output {tmp_path} is a directory; give a file name in it"),
                            (tmp_path / "no" / "out.json", f"--output {tmp_path / 'no' / 'out.json'}: directory "
                                                           f"{tmp_path / 'no'} does not exist")):
        assert main(["--load", str(tmp_path / "hf"), "--prompt-tokens", "1,2", "--tokens-to-generate", "1",
                     "--output", str(output)]) == 2
        assert capsys.readouterr().err == f"run_text_generation.py: error: {message}\n"


def test_megatron_server_script_flags_are_taken(tmp_path):
    """Megatron-LM's examples/inference/run_text_generation_server_345M.sh passes the model's shape
    (--num-layers --hidden-size --num-attention-heads --max-position-embeddings), --fp16, --micro-batch-size
    and --seq-length: each was 'unrecognized arguments'. The shape is checked against the checkpoint, the
    batch and length flags are accepted, --bf16 / --fp16 run the model in that dtype."""
    hf_model = tiny_hf_gpt2()
    hf_model.save_pretrained(tmp_path / "hf")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    megatron = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                "--max-position-embeddings", "32", "--micro-batch-size", "1", "--seq-length", "32", "--seed", "42"]
    base = [sys.executable, TOOL, "--load", str(tmp_path / "hf"), "--prompt-tokens", "5,17,99", "--top_k", "1",
            "--tokens-to-generate", "4", "--output", str(tmp_path / "out.json")]
    out, _ = _run(base + megatron, tmp_path)
    assert out["tokens"] == [_hf_greedy(hf_model, [5, 17, 99], 4)]
    out, _ = _run(base + megatron + ["--bf16"], tmp_path)
    assert len(out["tokens"][0]) == 7
    proc = subprocess.run(base + megatron[:2] + ["--hidden-size", "128"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2 and proc.stderr == ("run_text_generation.py: error: --hidden-size 128 disagrees with "
                                                    "the checkpoint's 64; drop the flag (the model's shape comes "
                                                    "from --load)\n"), proc.stderr


# Megatron-LM's Llama/Mistral generation command (docs/llama_mistral.md, examples/inference/llama_mistral):
# architecture flags checked against the checkpoint, run-time flags accepted.
LLAMA_SCRIPT_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads",
                      "4", "--group-query-attention", "--num-query-groups", "2", "--max-position-embeddings", "32",
                      "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--position-embedding-type", "rope",
                      "--use-rotary-position-embeddings", "--no-position-embedding", "--rotary-base", "10000",
                      "--rotary-percent", "1.0", "--swiglu", "--disable-bias-linear",
                      "--untie-embeddings-and-output-weights", "--no-masked-softmax-fusion",
                      "--attention-softmax-in-fp32", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
                      "--no-load-optim", "--no-load-rng", "--exit-on-missing-checkpoint", "--use-checkpoint-args",
                      "--out-seq-length", "32", "--micro-batch-size", "1", "--seq-length", "32"]


def test_megatron_llama_script_flags_are_checked_against_the_checkpoint(tmp_path, capsys):
    """The flags of Megatron-LM's Llama generation scripts (--group-query-attention, --swiglu, --normalization,
    --position-embedding-type, --disable-bias-linear, --untie-embeddings-and-output-weights, --out-seq-length,
    --no-load-optim, ...) were 'unrecognized arguments'. Architecture flags must match the loaded model (one
    line naming the flag and the checkpoint's value otherwise); the run-time ones are accepted."""
    from megatron_core.inference.text_generation_cli import main

    llama, gpt2 = tiny_hf_llama(), tiny_hf_gpt2()
    llama.save_pretrained(tmp_path / "llama")
    gpt2.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out.json"
    args = ["--prompt-tokens", "5,17,99", "--top_k", "1", "--tokens-to-generate", "4", "--output", str(out)]
    code = main(["--load", str(tmp_path / "llama"), *args, *LLAMA_SCRIPT_FLAGS])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert json.loads(out.read_text())["tokens"] == [_hf_greedy(llama, [5, 17, 99], 4)]
    for flags, message in ((["--swiglu"], "--swiglu: the checkpoint's MLP activation is gelu_tanh, not swiglu"),
                           (["--normalization", "RMSNorm"], "--normalization RMSNorm disagrees with the checkpoint's "
                                                            "LayerNorm"),
                           (["--position-embedding-type", "rope"], "--position-embedding-type rope disagrees with the "
                                                                   "checkpoint's learned_absolute"),
                           (["--use-rotary-position-embeddings"], "--use-rotary-position-embeddings: the checkpoint's "
                                                                  "position embedding is learned_absolute, not rope"),
                           (["--disable-bias-linear"], "--disable-bias-linear: the checkpoint's linear layers have "
                                                       "biases"),
                           (["--untie-embeddings-and-output-weights"], "--untie-embeddings-and-output-weights: the "
                                                                       "checkpoint ties its embedding and output "
                                                                       "layer")):
        assert main(["--load", str(tmp_path / "gpt2"), *args, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"run_text_generation.py: error: {message}") and err.count("\n") == 1, err


def test_megatron_llama3_launch_flags_transformer_impl_and_kernel_choices_are_accepted(tmp_path, capsys):
    """Megatron-LM's Llama 3 launch arguments (docs/llama_mistral.md "Launch model") carry
    --transformer-impl transformer_engine, and its inference scripts --no-rope-fusion and
    --no-gradient-accumulation-fusion: each was argparse's 'unrecognized arguments'. They pick kernels, not the
    weights: the same greedy tokens; an unknown implementation is still refused."""
    from megatron_core.inference.text_generation_cli import main

    llama = tiny_hf_llama()
    llama.save_pretrained(tmp_path / "llama")
    out = tmp_path / "out.json"
    args = ["--load", str(tmp_path / "llama"), "--prompt-tokens", "5,17,99", "--top_k", "1", "--tokens-to-generate",
            "4", "--output", str(out), *LLAMA_SCRIPT_FLAGS]
    for impl in ("transformer_engine", "local"):
        code = main([*args, "--transformer-impl", impl, "--no-rope-fusion", "--no-gradient-accumulation-fusion"])
        assert code == 0, capsys.readouterr().err
        assert json.loads(out.read_text())["tokens"] == [_hf_greedy(llama, [5, 17, 99], 4)]
    with pytest.raises(SystemExit):
        main([*args, "--transformer-impl", "inference_optimized_x"])
    assert "--transformer-impl: invalid choice" in capsys.readouterr().err


def test_a_temperature_past_megatron_lms_bound_is_one_line():
    """--temperature 1e39 overflowed float32: the logits became nan and torch.multinomial raised a traceback."""
    from megatron_core.errors import ConfigError
    from megatron_core.inference.text_generation_cli import build_parser, sampling_from_args

    args = build_parser().parse_args(["--load", "x", "--prompt", "hi", "--temperature", "1e39"])
    try:
        sampling_from_args(args)
    except ConfigError as exc:
        assert str(exc) == "--temperature must be at most 100 (Megatron-LM's bound), got 1e+39"
    else:
        raise AssertionError("--temperature 1e39 was accepted")


def test_the_dropout_flags_help_says_why_they_change_nothing():
    """Their help was the batching flags' ('prompts are batched as given; the length limit is ...')."""
    import argparse

    from megatron_core.inference.megatron_flags import add_megatron_args
    parser = argparse.ArgumentParser()
    add_megatron_args(parser)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for flag in ("--attention-dropout", "--hidden-dropout"):
        assert helps[flag] == "accepted: no effect here (generation runs the model in eval mode, without dropout)"
    assert "prompts are batched as given" in helps["--seq-length"]


def test_context_and_expert_sizes_of_one_are_accepted_and_others_are_one_line(tmp_path, capsys):
    """Megatron-LM's Mixtral server script spells out --expert-model-parallel-size 1, its Llama ones
    --context-parallel-size 1: argparse's 'unrecognized arguments' before; 1 now generates, 2 is one line."""
    from megatron_core.inference.text_generation_cli import main

    llama = tiny_hf_llama()
    llama.save_pretrained(tmp_path / "llama")
    out = tmp_path / "out.json"
    args = ["--load", str(tmp_path / "llama"), "--prompt-tokens", "5,17,99", "--top_k", "1", "--tokens-to-generate",
            "4", "--output", str(out)]
    off = ["--context-parallel-size", "1", "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1"]
    assert main([*args, *off]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["tokens"] == [_hf_greedy(llama, [5, 17, 99], 4)]
    capsys.readouterr()
    assert main([*args, "--expert-model-parallel-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--expert-model-parallel-size 2: generation has no expert parallelism here; drop the flag or give 1" in err
    assert "Traceback" not in err


def test_an_interpolation_factor_is_applied_as_in_training(tmp_path, capsys):
    """--rotary-seq-len-interpolation-factor is a run's choice (training may change it to extend a checkpoint's
    context): generation applies it to the loaded RoPE, giving what transformers gives with rope_type linear
    over the same weights. It was refused as disagreeing with the checkpoint's None."""
    from megatron_core.inference.text_generation_cli import main

    llama = tiny_hf_llama()
    llama.save_pretrained(tmp_path / "llama")
    linear = tiny_hf_llama(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    linear.load_state_dict(llama.state_dict())
    out = tmp_path / "out.json"
    prompt = [5, 17, 99, 3, 250, 7, 41, 8]
    args = ["--load", str(tmp_path / "llama"), "--prompt-tokens", ",".join(map(str, prompt)), "--top_k", "1",
            "--tokens-to-generate", "12", "--output", str(out)]
    assert main([*args, "--rotary-seq-len-interpolation-factor", "4"]) == 0, capsys.readouterr().err
    interpolated = json.loads(out.read_text())["tokens"]
    assert interpolated == [_hf_greedy(linear, prompt, 12)]
    assert main(args) == 0
    assert json.loads(out.read_text())["tokens"] == [_hf_greedy(llama, prompt, 12)] != interpolated


def test_a_prompt_that_is_not_utf8_is_a_one_line_error(tmp_path):
    """A byte that is not UTF-8 reaches sys.argv as a lone surrogate; the tokenizer's binding failed on it with
    a traceback ("TypeError: TextInputSequence must be str")."""
    hf_model = tiny_hf_gpt2(vocab_size=300)
    hf_model.save_pretrained(tmp_path / "hf")
    _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([os.fsencode(sys.executable), os.fsencode(TOOL), b"--load", os.fsencode(tmp_path / "hf"),
                           b"--prompt", b"ab\xffc", b"--tokens-to-generate", b"2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == ["run_text_generation.py: error: --prompt 'ab\\udcffc' is not UTF-8 text: a lone surrogate "
                     "'\\udcff' at character 2 (not Unicode text); pass the prompt in UTF-8"], proc.stderr[-3000:]


def _make_greedy_pick(path, token):
    """Rewrite a TP 1 legacy checkpoint so that greedy generation picks ``token`` after any prompt: the final
    norm outputs its bias, a large multiple of the (tied) embedding row of ``token``."""
    model_file = glob.glob(os.path.join(path, "iter_*", "mp_rank_00", "model_optim_rng.pt"))[0]
    state = torch.load(model_file, weights_only=False)
    model = state["model"]
    row = torch.randn(model["embedding.word_embeddings.weight"].shape[1], generator=torch.Generator().manual_seed(0))
    model["embedding.word_embeddings.weight"][token] = 10 * row
    model["decoder.final_layernorm.weight"].zero_()
    model["decoder.final_layernorm.bias"].copy_(row)
    torch.save(state, model_file)


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_a_null_tokenizer_run_generates_from_text_ids_and_stops_at_its_eod(tmp_path, ckpt_format):
    """A --mock-data run (NullTokenizer, --vocab-size 60) records its tokenizer, but the tool rebuilt none: a text
    prompt was 'gives no tokenizer (... files ... not at the recorded paths)', and the --tokenizer-type
    NullTokenizer it then asked for needed --vocab-size, 'unrecognized arguments' here. Generation from ids did not
    stop at the run's EOD (id 60). Now the recorded --vocab-size rebuilds it, as Megatron-LM's args do."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), "--num-layers", "1", "--hidden-size", "32",
             "--num-attention-heads", "4", "--seq-length", "16", "--max-position-embeddings", "16",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
             "--mock-data", "--vocab-size", "60", "--eval-iters", "0", "--save", str(tmp_path / "ckpt"),
             "--ckpt-format", ckpt_format]
    proc = subprocess.run(train, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = [sys.executable, TOOL, "--load", str(tmp_path / "ckpt"), "--tokens-to-generate", "6", "--top_k", "1",
            "--output", str(tmp_path / "out.json")]
    out, _ = _run(base + ["--prompt-tokens", "1,2,3"], tmp_path)
    by_ids = out["tokens"][0]
    assert by_ids[:3] == [1, 2, 3] and len(by_ids) == 9
    out, _ = _run(base + ["--prompt", "1 2 3"], tmp_path)
    assert out["tokens"] == [by_ids] and out["text"] == [" ".join(map(str, by_ids))], out
    out, _ = _run(base + ["--prompt", "1 2 3", "--tokenizer-type", "NullTokenizer", "--vocab-size", "60"], tmp_path)
    assert out["tokens"] == [by_ids]
    if ckpt_format == "torch":  # a model whose greedy choice is the EOD: the sequence ends with it
        _make_greedy_pick(tmp_path / "ckpt", 60)
        out, _ = _run(base + ["--prompt-tokens", "1,2,3"], tmp_path)
        assert out["tokens"] == [[1, 2, 3, 60]], out
