"""Checkpoints written by Megatron-LM / megatron-core load here (tests/megatron_lm_files.py builds them in
megatron-core 0.16.1's exact on-disk structure, without megatron-core).

Against the real megatron-core 0.16.1 on a CPU (docs/training.md, "Checkpoints written by Megatron-LM itself") the same
loads gave logits within 2.3e-6 of megatron-core's own forward (fp32); here the fixture's weights come from
our GPTModel, so the loaded model must reproduce its logits exactly.
"""
import argparse
import contextlib
import io

import pytest
import torch
import torch.distributed
from harness import run_distributed
from megatron_lm_files import ITERATION, megatron_enums, write_legacy, write_torch_dist

import pretrain_gpt
from megatron_core import parallel_state
from megatron_core.checkpoint.convert import main as convert
from megatron_core.checkpoint.core_format import load_core_checkpoint
from megatron_core.checkpoint.megatron_lm_dist import unstack_layers
from megatron_core.dist_checkpointing.full_model import load_full_model
from megatron_core.errors import ConfigError
from megatron_core.inference.loading import build_inference_model
from megatron_core.models.gpt import GPTModel
from megatron_core.transformer.config import TransformerConfig

VOCAB, PADDED, SEQ = 127, 128, 32  # Megatron-LM's NullTokenizer: --vocab-size 127 is 128 ids, padded to 128
CONFIGS = {
    "gpt": TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0),
    "llama": TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=176, activation="swiglu", normalization="RMSNorm",
                               add_bias_linear=False, position_embedding_type="rope",
                               share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0),
}
TOKENS = torch.randint(0, PADDED, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _logits(config, state):
    parallel_state.initialize_model_parallel(1)
    model = GPTModel(config, PADDED, SEQ)
    if state is None:  # the source model: random weights, the norms and biases too
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * (0.1 if p.dim() > 1 else 0.3))
        state = {k: v.clone() for k, v in model.state_dict().items()}
    else:
        model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return state, model(TOKENS)


def _source(kind):
    return run_distributed(_logits, 1, CONFIGS[kind], None)[0]


def _loaded_logits(load_dir):
    config, info, full, _ = load_core_checkpoint(load_dir)
    assert info["padded_vocab_size"] == PADDED and info["max_position_embeddings"] == SEQ
    # the record agrees with the model (make_model_info's, as this framework's own saves write it)
    assert info["share_embeddings_and_output_weights"] == config.share_embeddings_and_output_weights
    return config, _logits(config, full)[1]


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_a_megatron_lm_legacy_checkpoint_loads_from_its_args(kind, tmp_path):
    state, logits = _source(kind)
    write_legacy(str(tmp_path), state, CONFIGS[kind], VOCAB, PADDED, SEQ)
    config, loaded = run_distributed(_loaded_logits, 1, str(tmp_path))[0]
    assert config.to_dict() == CONFIGS[kind].to_dict()
    torch.testing.assert_close(loaded, logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_a_megatron_core_torch_dist_checkpoint_converts(kind, tmp_path, capsys):
    state, logits = _source(kind)
    src, dst = tmp_path / "mcore", tmp_path / "ours"
    write_torch_dist(str(src), state, CONFIGS[kind], VOCAB, PADDED, SEQ)
    full = load_full_model(str(src))
    assert full.iteration == ITERATION and full.tokenizer["tokenizer_type"] == "NullTokenizer"
    assert full.state.keys() == state.keys()
    assert convert(["--model-type", "GPT", "--loader", "core", "--saver", "core", "--load-dir", str(src),
                    "--save-dir", str(dst), "--target-tensor-parallel-size", "1"]) == 0
    config, loaded = run_distributed(_loaded_logits, 1, str(dst))[0]
    assert config.to_dict() == CONFIGS[kind].to_dict()
    torch.testing.assert_close(loaded, logits, rtol=0, atol=0)


def _generation_logits(load_dir):
    ps = parallel_state.initialize_model_parallel(1)
    loaded = build_inference_model(load_dir, ps)
    with torch.no_grad():
        return loaded.model(TOKENS)


@pytest.mark.parametrize("write", [write_legacy, write_torch_dist])
def test_text_generation_reads_megatron_lm_checkpoints(write, tmp_path):
    state, logits = _source("llama")
    write(str(tmp_path), state, CONFIGS["llama"], VOCAB, PADDED, SEQ)
    torch.testing.assert_close(run_distributed(_generation_logits, 1, str(tmp_path))[0], logits, rtol=0, atol=0)


def _cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        code = pretrain_gpt.cli(argv)
    torch.distributed.barrier()
    return code, err.getvalue(), out.getvalue()


RUN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-4", "--mock-data", "--num-workers", "0",
       "--eval-iters", "0", "--log-interval", "1"]


def test_pretrain_resumes_a_megatron_lm_legacy_checkpoint_without_its_optimizer(tmp_path):
    state, _ = _source("gpt")
    write_legacy(str(tmp_path), state, CONFIGS["gpt"], VOCAB, PADDED, SEQ)
    argv = ["--load", str(tmp_path), "--use-checkpoint-args", "--train-iters", str(ITERATION + 1), *RUN]
    code, err, out = run_distributed(_cli, 1, argv + ["--no-load-optim", "--no-load-rng"], timeout=120)[0]
    assert code == 0, err
    assert f"> loaded checkpoint from {tmp_path} at iteration {ITERATION} (optimizer: no, rng: no)" in out
    code, err, _ = run_distributed(_cli, 1, argv, timeout=120)[0]
    assert code == 2 and err.count("\n") == 1, err
    assert "is Megatron-LM's checkpoint" in err and "add --no-load-optim --no-load-rng, or --finetune" in err


def test_pretrain_names_the_conversion_for_a_megatron_core_torch_dist_checkpoint(tmp_path):
    state, _ = _source("gpt")
    write_torch_dist(str(tmp_path), state, CONFIGS["gpt"], VOCAB, PADDED, SEQ)
    argv = ["--load", str(tmp_path), "--finetune", "--use-checkpoint-args", "--train-iters", "1", *RUN]
    code, err, _ = run_distributed(_cli, 1, argv, timeout=120)[0]
    assert code == 2 and err.count("\n") == 1, err
    assert f"--load {tmp_path} is megatron-core's torch_dist checkpoint" in err
    assert f"tools/checkpoint/convert.py --model-type GPT --loader core --saver core --load-dir {tmp_path}" in err


class Gadget:
    """A class no allow-list names: its file must be refused, not unpickled."""


def _legacy_gpt_with_args(root, **args):
    """The GPT source as a Megatron-LM legacy checkpoint under ``root`` whose ``args`` also hold ``args``; its file."""
    state, _ = _source("gpt")
    write_legacy(str(root), state, CONFIGS["gpt"], VOCAB, PADDED, SEQ)
    path = root / f"iter_{ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    with megatron_enums():
        file = torch.load(path, weights_only=False)
        for name, value in args.items():
            setattr(file["args"], name, value)
        torch.save(file, path)
    return path


def test_a_megatron_lm_file_pickling_another_class_is_refused_in_one_line(tmp_path):
    path = _legacy_gpt_with_args(tmp_path, gadget=Gadget())
    with pytest.raises(ConfigError, match=rf"^{path} pickles test_megatron_lm_checkpoint.Gadget, which is not loaded"):
        load_core_checkpoint(str(tmp_path))


def test_a_megatron_lm_moe_checkpoint_is_refused_naming_the_flag(tmp_path):
    _legacy_gpt_with_args(tmp_path, num_experts=8)
    with pytest.raises(ConfigError, match=r"the Megatron-LM run used --num-experts 8, which this framework does not"):
        load_core_checkpoint(str(tmp_path))


@pytest.mark.parametrize("write", [write_legacy, write_torch_dist])
def test_a_damaged_megatron_lm_file_is_named_as_damaged_in_one_line(write, tmp_path):
    """Bytes overwritten inside the pickle, after its args Namespace: the file is damaged, not one that pickles
    a class (the legacy file was called 'not a plain-tensor checkpoint', common.pt raised UnpicklingError)."""
    state, _ = _source("gpt")
    write(str(tmp_path), state, CONFIGS["gpt"], VOCAB, PADDED, SEQ)
    iteration = tmp_path / f"iter_{ITERATION:07d}"
    path = iteration / "common.pt" if write is write_torch_dist else iteration / "mp_rank_00" / "model_optim_rng.pt"
    data = bytearray(path.read_bytes())
    start = data.index(b"Namespace") + 300
    data[start:start + 40] = b"\xff" * 40  # 0xff is no pickle opcode
    path.write_bytes(bytes(data))
    load = load_full_model if write is write_torch_dist else load_core_checkpoint
    with pytest.raises(ConfigError, match=rf"^{path} is (missing, )?truncated or damaged \(UnpicklingError") as info:
        load(str(tmp_path))
    assert "\n" not in str(info.value)
    if write is write_legacy:  # torch's pre-1.6 format, which the class scan cannot read, is not called damaged
        with megatron_enums():
            torch.save({"args": argparse.Namespace(num_layers=2), "model": state}, path,
                       _use_new_zipfile_serialization=False)
        with pytest.raises(ConfigError, match=rf"^{path} is not a plain-tensor checkpoint"):
            load(str(tmp_path))


def test_tokenizer_files_recorded_on_another_machine_are_replaced_by_the_given_ones(tmp_path):
    """Megatron-LM's args record the training cluster's absolute --vocab-file / --merge-file. Without them here the
    run said "pass --vocab-file PATH", and passing it said "--vocab-file ... disagrees with the checkpoint's
    /lustre/... under --use-checkpoint-args; drop --vocab-file or --use-checkpoint-args": no way through but giving
    every model flag by hand. A recorded file that does not exist here gives way to the given one."""
    from megatron_core.training.arguments import parse_args
    from megatron_core.training.arguments.validate import validate_args

    path = _legacy_gpt_with_args(tmp_path / "ckpt", tokenizer_type="GPT2BPETokenizer",
                                 vocab_file="/lustre/gpt2/vocab.json", merge_file="/lustre/gpt2/merges.txt")
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("{}")
    merges.write_text("#version: 0.2\n")
    argv = ["--load", str(tmp_path / "ckpt"), "--use-checkpoint-args", "--finetune", "--vocab-file", str(vocab),
            "--merge-file", str(merges), "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-4",
            "--mock-data", "--train-iters", "1"]
    args = validate_args(parse_args(argv), world_size=1)
    assert (args.tokenizer_type, args.vocab_file, args.merge_file) == ("GPT2BPETokenizer", str(vocab), str(merges))
    assert (args.num_layers, args.hidden_size) == (2, 64)
    other = tmp_path / "other.json"
    other.write_text("{}")
    with megatron_enums():  # a recorded file that is here still wins over another one
        file = torch.load(path, weights_only=False)
        file["args"].vocab_file = str(vocab)
        torch.save(file, path)
    with pytest.raises(ConfigError, match=f"--vocab-file {other} disagrees with the checkpoint's {vocab}"):
        validate_args(parse_args([*argv[:5], str(other), *argv[6:]]), world_size=1)


def _write_uneven_pp2(root, state, config, **flags):
    """Megatron-LM's PP 2 legacy files of a 3-layer model cut 1 + 2 (--decoder-first-pipeline-num-layers 1):
    ``mp_rank_00_000`` and ``mp_rank_00_001``, each stage numbering its layers from 0 (as
    ``state_dict_for_save_checkpoint`` does; checked against megatron-core 0.16.1 at an even PP 2), the last
    stage holding the tied output layer's copy of the word embeddings."""
    import os
    import random

    from megatron_lm_files import megatron_lm_args
    stages = [{k: v for k, v in state.items() if k.startswith(("embedding.", "decoder.layers.0."))}, {}]
    for key, value in state.items():
        for layer in (1, 2):
            if key.startswith(f"decoder.layers.{layer}."):
                stages[1][key.replace(f"layers.{layer}.", f"layers.{layer - 1}.")] = value
        if key.startswith("decoder.final_layernorm."):
            stages[1][key] = value
    stages[1]["output_layer.weight"] = state["embedding.word_embeddings.weight"].clone()
    with megatron_enums() as backend:
        args = megatron_lm_args(config, VOCAB, PADDED, SEQ, backend)
        args.pipeline_model_parallel_size, args.decoder_first_pipeline_num_layers = 2, 1
        vars(args).update(flags)
        for rank, model in enumerate(stages):
            folder = os.path.join(root, f"iter_{ITERATION:07d}", f"mp_rank_00_{rank:03d}")
            os.makedirs(folder)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "model": model,
                        "rng_state": [{"random_rng_state": random.getstate()}]},
                       os.path.join(folder, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(ITERATION))


def test_an_uneven_pipeline_split_of_megatron_lm_loads(tmp_path):
    """--decoder-first-pipeline-num-layers was not read from Megatron-LM's args: its PP 2 checkpoint of 3 layers
    (1 + 2) raised "ValueError: --num-layers 3 does not split evenly over --pipeline-model-parallel-size 2"."""
    import dataclasses

    config = dataclasses.replace(CONFIGS["gpt"], num_layers=3)
    state, logits = run_distributed(_logits, 1, config, None)[0]
    _write_uneven_pp2(str(tmp_path), state, config)
    loaded_config, loaded = run_distributed(_loaded_logits, 1, str(tmp_path))[0]
    assert loaded_config.num_layers == 3 and loaded_config.layer_counts(1) == [3]  # whole: any layout cuts it
    torch.testing.assert_close(loaded, logits, rtol=0, atol=0)


def test_megatron_lms_other_pipeline_splits_are_refused_naming_the_flag(tmp_path):
    """--account-for-embedding-in-pipeline-split moves layers between the stages' files in a way not read here:
    refused in one line rather than merged wrong."""
    import dataclasses

    config = dataclasses.replace(CONFIGS["gpt"], num_layers=3)
    state, _ = run_distributed(_logits, 1, config, None)[0]
    _write_uneven_pp2(str(tmp_path), state, config, account_for_embedding_in_pipeline_split=True)
    with pytest.raises(ConfigError, match=r"cut its 2 pipeline stages with --account-for-embedding-in-pipeline-split, "
                                          r"which this framework does not read"):
        load_core_checkpoint(str(tmp_path))


def test_a_legacy_checkpoint_with_transformer_engines_extra_states_loads(tmp_path):
    """Transformer Engine's layers save their ``_extra_state`` as a uint8 tensor (empty without FP8:
    ``get_extra_state``'s ``torch.empty(0, dtype=torch.uint8)``), not None: dropped all the same."""
    state, logits = _source("gpt")
    write_legacy(str(tmp_path), state, CONFIGS["gpt"], VOCAB, PADDED, SEQ)
    path = tmp_path / f"iter_{ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    with megatron_enums():
        file = torch.load(path, weights_only=False)
        extra = [name for name in file["model"] if name.endswith("._extra_state")]
        assert extra
        file["model"].update({name: torch.empty(0, dtype=torch.uint8) for name in extra})
        torch.save(file, path)
    config, loaded = run_distributed(_loaded_logits, 1, str(tmp_path))[0]
    torch.testing.assert_close(loaded, logits, rtol=0, atol=0)


def test_unstack_layers_splits_the_leading_axis_and_refuses_a_tensor_without_one():
    layers = unstack_layers({"decoder.layers.scale": torch.tensor([1.0, 2.0]), "embedding.w": torch.ones(3)}, 2)
    assert sorted(layers) == ["decoder.layers.0.scale", "decoder.layers.1.scale", "embedding.w"]
    assert layers["decoder.layers.1.scale"].dim() == 0 and float(layers["decoder.layers.1.scale"]) == 2.0
    with pytest.raises(ValueError, match=r"decoder.layers.scale has shape \(\), not \[num_layers=2, ...\]"):
        unstack_layers({"decoder.layers.scale": torch.tensor(1.0)}, 2)
    with pytest.raises(ValueError, match=r"has shape \(3,\), not \[num_layers=2"):
        unstack_layers({"decoder.layers.scale": torch.ones(3)}, 2)
