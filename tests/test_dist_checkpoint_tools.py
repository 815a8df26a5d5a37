"""The default checkpoint format (torch_dist) through the tools: pretrain_gpt.py writes it unless told
``--ckpt-format torch``; tools/checkpoint/convert.py reads it as it reads the legacy layout (the same
full model, re-sharded keeping the iteration, the run's SentencePiece tokenizer carried along); the Hugging
Face export of a Llama-shaped run loads with ``AutoTokenizer`` (tokenizer.json written at export) with the
tokenizer's real special ids; tools/run_text_generation.py generates from the training checkpoint with
no tokenizer flags, token for token as Hugging Face ``generate`` on the export. A run resuming a legacy
checkpoint keeps its format (and --use-checkpoint-args reads a legacy one too); a directory mixing both
resumes the newest."""
import json
import os
import subprocess
import sys

import pytest
import torch
from harness import run_distributed
from test_failures_training import _run
from test_tokenizer import stdlib_text

from megatron_core.checkpoint import convert
from megatron_core.checkpoint.hf_tokenizer import load_dir_tokenizer
from megatron_core.dist_checkpointing import is_dist_checkpoint
from megatron_core.tokenizer.build import build_tokenizer
from megatron_core.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer
from megatron_core.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer
from megatron_core.tokenizer.train_tokenizer import train_sentencepiece
from megatron_core.training import checkpoint_io as io
from megatron_core.training.arguments import build_parser, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
         "--lr", "1e-2", "--mock-data", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--seed", "5",
         "--position-embedding-type", "rope", "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--tensor-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same TP 2 run saved in the default format (dist/) and with --ckpt-format torch (legacy/)."""
    d = tmp_path_factory.mktemp("trained")
    (d / "corpus.txt").write_text(stdlib_text(), encoding="utf-8")
    model = train_sentencepiece([str(d / "corpus.txt")], str(d / "tok"), vocab_size=400)
    flags = LLAMA + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]
    for name, extra in (("dist", []), ("legacy", ["--ckpt-format", "torch"])):
        results = run_distributed(_run, 2, flags + ["--save", str(d / name), *extra], timeout=120)
        assert not any(isinstance(r, str) for r in results), results
    return d, model, flags


def test_convert_reads_the_default_format_as_the_legacy_one(trained, tmp_path):
    d, model, _ = trained
    assert {".metadata", "common.pt", io.MANIFEST_FILENAME} <= set(os.listdir(io.iteration_dir(d / "dist", 2)))
    assert sorted(os.listdir(io.iteration_dir(d / "legacy", 2))) == [io.MANIFEST_FILENAME, "mp_rank_00", "mp_rank_01"]
    assert is_dist_checkpoint(str(d / "dist")) and not is_dist_checkpoint(str(d / "legacy"))
    assert not is_dist_checkpoint(str(tmp_path)), "no tracker: not a torch_dist checkpoint"
    dist, legacy = convert.load_core(str(d / "dist")), convert.load_core(str(d / "legacy"))
    assert dist.iteration == legacy.iteration == 2 and dist.vocab_size == legacy.vocab_size == 400
    assert sorted(dist.state) == sorted(legacy.state)
    for key, value in legacy.state.items():
        assert torch.equal(dist.state[key], value), key
    assert isinstance(dist.tokenizer, SentencePieceTokenizer) and dist.tokenizer.model_file == model
    # Re-shard the torch_dist checkpoint to TP 1 x PP 2 (legacy layout): same tensors, same iteration.
    assert convert.main(["--model-type", "GPT", "--loader", "core", "--saver", "core", "--load-dir", str(d / "dist"),
                         "--save-dir", str(tmp_path / "pp2"), "--target-pipeline-parallel-size", "2"]) == 0
    assert (tmp_path / "pp2" / io.TRACKER_FILENAME).read_text() == "2"
    resharded = convert.load_core(str(tmp_path / "pp2"))
    assert all(torch.equal(resharded.state[k], v) for k, v in legacy.state.items())


def test_sentencepiece_export_and_text_generation_from_the_training_checkpoint(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, model, _ = trained
    out = tmp_path / "hf"
    assert convert.main(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir", str(d / "dist"),
                         "--save-dir", str(out)]) == 0
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    sentence = "def main(argv):\n    return len(argv) + 42  # the answer"
    hf_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tokenizer(sentence, add_special_tokens=False)["input_ids"] == ours.tokenize(sentence)
    # A re-import reads the directory as Hugging Face does (tokenizer.json; test_tokenizer_hf_dir.py): the
    # conversion gives the SentencePiece model's ids, which travels beside it.
    reread = load_dir_tokenizer(str(out))
    assert isinstance(reread, HuggingFaceTokenizer) and reread.tokenize(sentence) == ours.tokenize(sentence)
    assert hf_tokenizer(sentence)["input_ids"] == ours.tokenize(sentence) and (out / "tokenizer.model").is_file()
    assert (ours.bos, ours.eod) == (1, 2)  # train_sentencepiece's ids; no pad piece
    for name in ("config.json", "generation_config.json"):
        config = json.loads((out / name).read_text())
        assert (config.get("bos_token_id"), config.get("eos_token_id"), config.get("pad_token_id")) == (1, 2, None)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400  # TP padding trimmed

    prompt = "def main("
    ids = ours.tokenize(prompt)
    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "run_text_generation.py"), "--load",
                           str(d / "dist"), "--prompt", prompt, "--tokens-to-generate", "6", "--top_k", "1",
                           "--output", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["tokens"][0] == expected and result["text"][0] == ours.detokenize(expected)


def test_a_legacy_series_stays_legacy_and_a_mixed_directory_resumes_the_newest(trained, tmp_path, capfd):
    import shutil

    d, _, flags = trained
    flags = flags + ["--override-opt-param-scheduler"]  # each resume trains longer: decay over the new length
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(d / "legacy", ckpt)
    capfd.readouterr()
    model_flags = {"--num-layers": 1, "--hidden-size": 1, "--num-attention-heads": 1, "--seq-length": 1,
                   "--max-position-embeddings": 1, "--position-embedding-type": 1, "--normalization": 1,
                   "--swiglu": 0, "--disable-bias-linear": 0, "--untie-embeddings-and-output-weights": 0}
    bare, skip = [], 0
    for token in flags:
        if skip:
            skip -= 1
        elif token in model_flags:
            skip = model_flags[token]
        else:
            bare.append(token)
    # No --ckpt-format: it keeps the legacy one; no model flags: --use-checkpoint-args reads the legacy files.
    longer = bare + ["--train-iters", "3", "--save", ckpt, "--load", ckpt, "--use-checkpoint-args"]
    results = run_distributed(_run, 2, longer, timeout=120)
    assert [r.loaded_iteration for r in results if r is not None and not isinstance(r, str)] == [2], results
    assert "saving in that format; pass --ckpt-format torch_dist to switch" in capfd.readouterr().out
    assert os.path.isdir(os.path.join(io.iteration_dir(ckpt, 3), "mp_rank_00"))
    results = run_distributed(_run, 2, flags + ["--train-iters", "4", "--save", ckpt, "--load", ckpt,
                                                "--ckpt-format", "torch_dist"], timeout=120)  # the flag wins
    assert os.path.isfile(os.path.join(io.iteration_dir(ckpt, 4), "common.pt"))
    results = run_distributed(_run, 2, flags + ["--train-iters", "5", "--save", ckpt, "--load", ckpt], timeout=120)
    assert [r.loaded_iteration for r in results if r is not None and not isinstance(r, str)] == [4], results
    assert os.path.isfile(os.path.join(io.iteration_dir(ckpt, 5), "common.pt"))  # torch_dist resumed: torch_dist
    assert io.complete_iterations(ckpt) == [2, 3, 4, 5]


def test_a_sequence_parallel_run_with_a_relative_tokenizer_path_generates_at_tp1_from_elsewhere(
        trained, tmp_path, monkeypatch):
    """As the demo: ``--tokenizer-model`` relative to the training run's directory, and ``--sequence-parallel``
    (a training-memory option). Generation from another directory at TP 1 finds the tokenizer (recorded
    absolute) and runs without sequence parallelism: the same greedy tokens as HF ``generate`` on the export."""
    from transformers import AutoModelForCausalLM

    d, model, flags = trained
    flags = [os.path.relpath(model, d) if token == model else token for token in flags]
    monkeypatch.chdir(d)  # the forked ranks start here, where the relative path resolves
    results = run_distributed(_run, 2, flags + ["--sequence-parallel", "--save", str(tmp_path / "sp")], timeout=120)
    assert not any(isinstance(r, str) for r in results), results
    monkeypatch.chdir(tmp_path)
    assert convert.main(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir",
                         str(tmp_path / "sp"), "--save-dir", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the recorded path was found from here
    ids = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model).tokenize("def main(")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "run_text_generation.py"), "--load",
                           str(tmp_path / "sp"), "--prompt", "def main(", "--tokens-to-generate", "6", "--top_k", "1",
                           "--output", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["tokens"][0] == expected


def test_a_reshard_keeps_the_vocabulary_padding_rows(trained, tmp_path):
    """400 tokens padded to 512 under TP 2: the run's 112 padding rows (their logits join the softmax) come
    out of a re-shard of either format as saved, as the legacy run's own files hold them. They were
    replaced by copies of the last true row."""
    d, _, _ = trained
    for source in ("dist", "legacy"):
        out = tmp_path / source
        assert convert.main(["--model-type", "GPT", "--loader", "core", "--saver", "core", "--load-dir",
                             str(d / source), "--save-dir", str(out), "--target-tensor-parallel-size", "2"]) == 0
        for rank in ("mp_rank_00", "mp_rank_01"):
            saved, resharded = (torch.load(os.path.join(io.iteration_dir(root, 2), rank, io.MODEL_FILENAME),
                                           weights_only=True)["model"] for root in (d / "legacy", out))
            assert saved["output_layer.weight"].shape[0] == 256 and sorted(saved) == sorted(resharded)
            for key, value in saved.items():
                assert torch.equal(resharded[key], value), (source, rank, key)


def test_a_legacy_training_checkpoint_records_its_tokenizer(trained, tmp_path):
    """Megatron-LM's legacy checkpoint carries its args, so --use-checkpoint-args gives the tokenizer type; here
    a legacy training checkpoint recorded no tokenizer: `--load LEGACY --use-checkpoint-args` stopped on
    "--tokenizer-type is required" and text generation / the Hugging Face export had none. Now it records the run's
    --tokenizer-* flags as torch_dist does, and a re-shard carries them."""
    from megatron_core.training.arguments.checkpoint_args import apply_checkpoint_args

    d, model, _ = trained
    args = parse_args(["--load", str(d / "legacy"), "--use-checkpoint-args", "--mock-data", "--micro-batch-size", "2",
                       "--train-iters", "3", "--lr", "1e-3"])
    apply_checkpoint_args(args, vars(build_parser().parse_args([])))
    assert (args.tokenizer_type, args.tokenizer_model) == ("SentencePieceTokenizer", model)
    full = convert.load_core(str(d / "legacy"))
    assert isinstance(full.tokenizer, SentencePieceTokenizer) and full.tokenizer.vocab_size == 400
    resharded = str(tmp_path / "tp1")
    convert.main(["--model-type", "GPT", "--loader", "core", "--saver", "core", "--load-dir", str(d / "legacy"),
                  "--save-dir", resharded, "--target-tensor-parallel-size", "1"])
    args = parse_args(["--load", resharded, "--use-checkpoint-args", "--mock-data", "--micro-batch-size", "2",
                       "--train-iters", "3", "--lr", "1e-3"])
    apply_checkpoint_args(args, vars(build_parser().parse_args([])))
    assert args.tokenizer_type == "SentencePieceTokenizer"
