"""The weights directory ``tools/zero_to_fp32.py`` writes is the one transformers' ``save_pretrained`` writes.

Same cut into shards (huggingface_hub's: a tensor larger than the limit alone in its own shard, the
others in key order), same file names, byte-identical safetensors files and index; a later write into
the same directory leaves no shard or index of the earlier one behind. The model is a tiny Llama with
untied embeddings, so its state dict is exactly what ``save_pretrained`` writes.
"""
import json
import os

import pytest
import torch
from hf_testing import tiny_hf_llama

from megatron_core.checkpoint.hf_io import write_weights_dir
from megatron_core.errors import ConfigError


def _files(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))
            if name.startswith(("model", "pytorch_model"))}


def test_shards_and_index_are_what_save_pretrained_writes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_hf_llama(vocab_size=256, hidden=64, tie_word_embeddings=False)
    # 40 KB: the 64 KB embedding and output layer exceed it, each goes alone into a shard of its own.
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    state = model.state_dict()
    write_weights_dir(state, str(tmp_path / "ours"), True, 40_000, total_parameters=model.num_parameters())
    theirs, ours = _files(tmp_path / "hf"), _files(tmp_path / "ours")
    assert len(theirs) > 3 and "model.safetensors.index.json" in theirs
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], name
    index = json.loads(ours["model.safetensors.index.json"])
    assert index["weight_map"]["model.embed_tokens.weight"] == f"model-00001-of-{len(theirs) - 1:05d}.safetensors"
    model.config.save_pretrained(str(tmp_path / "ours"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_rewrite_leaves_nothing_of_the_earlier_layout(tmp_path):
    from safetensors.torch import load_file

    state = {f"w{i}": torch.full((10, 10), float(i)) for i in range(4)}  # 400 bytes each
    write_weights_dir(state, str(tmp_path), True, 1000)
    assert sorted(_files(tmp_path)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                        "model.safetensors.index.json"]
    write_weights_dir(state, str(tmp_path), True, 500)
    assert len(_files(tmp_path)) == 5  # four shards of one tensor, the index
    write_weights_dir(state, str(tmp_path), True, None)
    assert sorted(_files(tmp_path)) == ["model.safetensors"]
    assert load_file(str(tmp_path / "model.safetensors")).keys() == state.keys()
    # transformers reads model.safetensors before an index: a sharded rewrite left it, and it was loaded
    write_weights_dir(state, str(tmp_path), True, 1000)
    assert sorted(_files(tmp_path)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                        "model.safetensors.index.json"]
    # ... and before any pytorch_model*.bin: .bin output beside it is refused in one line
    with pytest.raises(ConfigError, match=r"model.safetensors.index.json is an earlier write's, which transformers "
                                          r"would load instead of the pytorch_model\*.bin files asked for; remove it"):
        write_weights_dir(state, str(tmp_path), False, 1000)
    for name in _files(tmp_path):
        os.remove(tmp_path / name)
    write_weights_dir(state, str(tmp_path), False, None)
    write_weights_dir(state, str(tmp_path), False, 1000)
    assert sorted(_files(tmp_path)) == ["pytorch_model-00001-of-00002.bin",
                                        "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    assert index == {"metadata": {"total_size": 1600}, "weight_map": {"w0": "pytorch_model-00001-of-00002.bin",
                     "w1": "pytorch_model-00001-of-00002.bin", "w2": "pytorch_model-00002-of-00002.bin",
                     "w3": "pytorch_model-00002-of-00002.bin"}}
