"""Hugging Face export carries the tokenizer: HF (with tokenizer) -> Megatron checkpoint at TP2 x PP2 ->
HF gives a directory that ``AutoTokenizer``/``AutoModelForCausalLM`` load, the tokenizer's real special ids
in config.json and generation_config.json, the vocabulary without TP padding, normal file permissions,
the same logits; a checkpoint from training plus GPT-2 BPE files exports the same way; resharding keeps
the source iteration."""
import json
import os
import stat

import pytest
import torch

from megatron_core.checkpoint import convert
from tests.hf_testing import tiny_hf_gpt2, tiny_hf_llama
from tests.test_text_generation_cli import _save_tokenizer_json

TEXT = "def f(x):\n    return the quick brown fox"


def _convert(*args):
    assert convert.main(["--model-type", "GPT", *map(str, args)]) == 0


def _check_export(path, hf_model, reference_ids, specials):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == reference_ids
    config, generation = (json.load(open(os.path.join(path, name))) for name in ("config.json",
                                                                                "generation_config.json"))
    for key, value in specials.items():
        assert config[key] == value and generation.get(key) == value, f"{key}: {config[key]}, {generation.get(key)}"
    assert config["vocab_size"] == hf_model.config.vocab_size
    for name in os.listdir(path):
        mode = stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode)
        assert mode == 0o666 & ~_umask(), f"{name} has mode {oct(mode)}"
    exported = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    ids = torch.tensor([reference_ids])
    assert torch.equal(exported(ids).logits, hf_model(ids).logits)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_round_trip_with_tokenizer_json(tmp_path, family):
    from transformers import PreTrainedTokenizerFast

    raw = _save_tokenizer_json(tmp_path / "tokenizer.json")
    raw.add_special_tokens(["<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")
    hf_model = (tiny_hf_gpt2 if family == "gpt2" else tiny_hf_llama)(vocab_size=len(fast))
    hf_model.save_pretrained(tmp_path / "hf")
    fast.save_pretrained(tmp_path / "hf")
    specials = {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}
    assert specials["pad_token_id"] != specials["eos_token_id"]
    _convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
             "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2, "--iteration", 7)
    info = torch.load(tmp_path / "ckpt" / "iter_0000007" / "mp_rank_00_000" / "model_optim_rng.pt",
                      weights_only=False)["model_info"]
    assert info["padded_vocab_size"] == 512 and info["tokenizer"]["eos_token_id"] == specials["eos_token_id"]
    _convert("--loader", "core", "--saver", "core", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "tp1")
    assert (tmp_path / "tp1" / "latest_checkpointed_iteration.txt").read_text() == "7", "resharding lost the iteration"
    _convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "tp1", "--save-dir", tmp_path / "out")
    _check_export(tmp_path / "out", hf_model, fast(TEXT, add_special_tokens=False)["input_ids"], specials)


def test_training_checkpoint_with_gpt2_bpe_files(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT * 20], vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    eod = bpe.token_to_id("<|endoftext|>")
    hf_model = tiny_hf_gpt2(vocab_size=bpe.get_vocab_size())
    hf_model.save_pretrained(tmp_path / "hf")
    _convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt")
    _convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "out",
             "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tmp_path / "vocab.json",
             "--merge-file", tmp_path / "merges.txt")
    _check_export(tmp_path / "out", hf_model, bpe.encode(TEXT).ids,
                  {"bos_token_id": None, "eos_token_id": eod, "pad_token_id": None})
    # Import reads the same: the exported directory brings its tokenizer into a Megatron checkpoint.
    assert convert.load_hf(str(tmp_path / "out")).tokenizer.tokenize(TEXT) == bpe.encode(TEXT).ids


def test_export_without_tokenizer_has_no_made_up_special_ids(tmp_path):
    hf_model = tiny_hf_gpt2(vocab_size=300)
    hf_model.save_pretrained(tmp_path / "hf")
    _convert("--loader", "hf", "--saver", "hf", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "out")
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config.get("eos_token_id") is None and config.get("bos_token_id") is None  # not GPT-2's 50256


@pytest.mark.parametrize("flags,dtype", [([], "float32"), (["--bf16"], "bfloat16"), (["--fp16"], "float16")])
def test_export_records_the_weights_dtype_in_config_json(tmp_path, flags, dtype):
    """config.json names the weights' dtype, as save_pretrained writes it ("dtype" from transformers 5,
    "torch_dtype" before): a bf16 export had none, so tools that take the dtype from the config (vLLM's
    "auto", TGI) read no dtype for bf16 weights."""
    from transformers import AutoConfig

    tiny_hf_gpt2(vocab_size=300).save_pretrained(tmp_path / "hf")
    _convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "core",
             *flags)
    _convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "core", "--save-dir", tmp_path / "out")
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config.get("dtype", config.get("torch_dtype")) == dtype, config
    assert AutoConfig.from_pretrained(tmp_path / "out", local_files_only=True).to_dict().get(
        "dtype", config.get("torch_dtype")) == dtype


@pytest.mark.parametrize("family,change,named", [
    ("gpt2", dict(normalization="RMSNorm"), "normalization=RMSNorm"),
    ("gpt2", dict(activation="swiglu"), "activation=swiglu"),
    ("gpt2", dict(add_bias_linear=False), "add_bias_linear=False"),
    ("gpt2", dict(position_embedding_type="rope"), "position_embedding_type=rope"),
    ("gpt2", dict(num_query_groups=2), "num_query_groups=2"),
    ("gpt2", dict(kv_channels=16), "kv_channels=16"),
    ("llama", dict(normalization="LayerNorm"), "normalization=LayerNorm"),
    ("llama", dict(activation="gelu"), "activation=gelu"),
    ("llama", dict(rotary_percent=0.5), "position_embedding_type=rope rotary_percent=0.5"),
    ("llama", dict(add_qkv_bias=True), "add_qkv_bias without add_bias_linear"),
    # HF's rope_scaling holds one rope_type: llama3 or linear, not both
    ("llama", dict(rope_scaling=True, seq_len_interpolation_factor=2.0),
     "both Llama 3 RoPE scaling and linear position interpolation"),
])
def test_export_names_what_the_hf_class_cannot_hold(family, change, named):
    """Each feature outside GPT2LMHeadModel / LlamaForCausalLM is refused by name, and only it (the
    unchanged preset exports)."""
    import dataclasses

    from megatron_core.checkpoint import hf_gpt2, hf_llama
    from megatron_core.checkpoint.hf_errors import UnsupportedModel
    from megatron_core.models.presets import gpt2_config, llama_config

    module, preset, cls = {"gpt2": (hf_gpt2, gpt2_config, "GPT2LMHeadModel"),
                           "llama": (hf_llama, llama_config, "LlamaForCausalLM")}[family]
    config = preset(2, 32, 4, ffn_hidden_size=64)
    assert module.config_to_hf(config, 64, 16).hidden_size == 32
    with pytest.raises(UnsupportedModel) as error:
        module.config_to_hf(dataclasses.replace(config, **change), 64, 16)
    assert str(error.value) == (f"{cls} cannot hold a model with {named}; keep it as a Megatron checkpoint "
                                f"(tools/run_text_generation.py and the server load it)")


def test_sentencepiece_control_pieces_export_as_whole_tokens(tmp_path):
    """SentencePiece control pieces (``<s>``, a ``control_symbols`` entry) become special added tokens:
    in text they stay one token, as in Hugging Face's own converted Llama tokenizers, and
    ``skip_special_tokens`` drops them; a user-defined piece stays an ordinary token."""
    import sentencepiece
    from transformers import AutoTokenizer

    from megatron_core.checkpoint.hf_tokenizer import save_tokenizer
    from megatron_core.tokenizer.build import build_tokenizer
    from tests.test_tokenizer import stdlib_text

    prefix = str(tmp_path / "spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_text().splitlines()[:3000]), model_prefix=prefix, vocab_size=400,
        model_type="bpe", control_symbols=["<ctl>"], user_defined_symbols=["<usr>"], byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=prefix + ".model")
    save_tokenizer(ours, str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    piece = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model").piece_to_id
    for control in ("<ctl>", "<s>"):
        ids = hf(f"a {control} b", add_special_tokens=False)["input_ids"]
        assert piece(control) in ids and hf.decode(ids, skip_special_tokens=True) == "a b", (control, ids)
    ids = hf("a <usr> b", add_special_tokens=False)["input_ids"]
    assert ids == ours.tokenize("a <usr> b") and piece("<usr>") in ids
    assert hf.decode(ids, skip_special_tokens=True) == "a <usr> b"


def test_llama_with_biases_round_trips():
    """A Llama with attention and MLP biases (random, as HF initialises them to zero): Hugging Face ->
    Megatron -> Hugging Face gives back every tensor, and the config keeps both bias flags."""
    from megatron_core.checkpoint import hf_llama

    hf_model = tiny_hf_llama(layers=1, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    config, vocab, positions = hf_llama.config_from_hf(hf_model.config)
    state = hf_model.state_dict()
    back = hf_llama.state_to_hf(hf_llama.state_to_core(state, config), config)
    assert sorted(back) == sorted(state) and any(k.endswith("gate_proj.bias") for k in back)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    exported = hf_llama.config_to_hf(config, vocab, positions)
    assert exported.attention_bias and exported.mlp_bias


def test_recorded_tokenizer_flags_rebuild_the_tokenizer_only_when_its_files_exist(tmp_path):
    """convert.py rebuilds the training run's tokenizer from its recorded flags; without a type, with
    NullTokenizer (no text), without files, or with a file gone (another machine) there is none."""
    from megatron_core.checkpoint.convert import tokenizer_from_flags
    from megatron_core.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

    path = str(tmp_path / "tokenizer.json")
    _save_tokenizer_json(path)
    hf = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": path}
    assert isinstance(tokenizer_from_flags(hf), HuggingFaceTokenizer)
    for flags in ({}, {"tokenizer_model": path}, {"tokenizer_type": "NullTokenizer", "vocab_file": path},
                  {"tokenizer_type": "HuggingFaceTokenizer"}, {**hf, "tokenizer_model": path + ".gone"}):
        assert tokenizer_from_flags(flags) is None, flags


def test_export_over_an_earlier_sharded_save_loads_the_exported_weights(tmp_path):
    """An export into a folder that holds a sharded ``save_pretrained`` (say, the model the run was imported
    from) removes the old shards and index, as ``save_pretrained`` cleans its folder; they were left beside
    the new ``model.safetensors`` (transformers reads that file first, a reader of the index the old weights)."""
    from transformers import AutoModelForCausalLM

    trained, old = tiny_hf_gpt2(seed=1), tiny_hf_gpt2(seed=2)
    trained.save_pretrained(tmp_path / "trained")
    _convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "trained", "--save-dir", tmp_path / "core")
    old.save_pretrained(tmp_path / "out", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    _convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "core", "--save-dir", tmp_path / "out")
    assert sorted(n for n in os.listdir(tmp_path / "out") if "safetensors" in n) == ["model.safetensors"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    want = trained.state_dict()
    for key, value in exported.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_save_hf_dir_shards_as_save_pretrained(tmp_path):
    """Above ``max_shard_bytes`` the weights are cut as transformers cuts them: the same files, bytes and index."""
    from megatron_core.checkpoint.hf_io import save_hf_dir

    model = tiny_hf_gpt2(seed=3)
    model.save_pretrained(tmp_path / "theirs", max_shard_size=40_000)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: saved once, as HF
    save_hf_dir(str(tmp_path / "ours"), model.config, state, max_shard_bytes=40_000)
    theirs = sorted(n for n in os.listdir(tmp_path / "theirs") if n.startswith("model"))
    assert len(theirs) > 2 and sorted(n for n in os.listdir(tmp_path / "ours") if n.startswith("model")) == theirs
    for name in theirs:
        if name.endswith(".safetensors"):
            assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    index = [json.load(open(tmp_path / d / "model.safetensors.index.json")) for d in ("ours", "theirs")]
    assert index[0] == index[1]


def test_export_of_an_fp32_residual_run_says_the_stream_becomes_16_bit(tmp_path, capfd):
    """A bf16 run with --fp32-residual-connection exports 16-bit weights, and GPT2LMHeadModel adds its residual in
    them: one note says so (a bf16 run without the flag gets none; fp32 training refuses the flag)."""
    import pretrain_gpt
    from tests.test_pretrain import TINY

    for flags, noted in ((["--bf16", "--fp32-residual-connection"], True), (["--bf16"], False)):
        ckpt, out = tmp_path / f"ckpt{len(flags)}{noted}", tmp_path / f"hf{len(flags)}{noted}"
        argv = [a for a in TINY if a not in ("--train-iters", "20")] + ["--train-iters", "1", "--save", str(ckpt),
                                                                        "--eval-iters", "0", *flags]
        pretrain_gpt.main(argv)
        capfd.readouterr()
        _convert("--loader", "core", "--saver", "hf", "--load-dir", ckpt, "--save-dir", out)
        err = capfd.readouterr().err
        assert ("was trained with --fp32-residual-connection" in err) == noted, (flags, err)
