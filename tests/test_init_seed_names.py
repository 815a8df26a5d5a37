"""Seeded initialisation follows the module tree: every weight is drawn from the seed of its own name.

Each module gets the prefix of its place in the whole model, so the seed name of a weight must be
exactly its name in the unsplit ``GPTModel.named_parameters()``, whatever the pipeline split. A
pipeline stage names its layers locally (``decoder.layers.0`` on every stage); mapped to global
layer numbers, its weights must equal the draw from the global name's seed. A wrong prefix (a local
layer index, a renamed attribute, a hand-written path) gives a different draw and fails here.
"""
import re

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from megatron_core import parallel_state
from megatron_core.models.gpt import build_gpt_model_chunks
from megatron_core.models.presets import gpt2_config, llama_config

VOCAB, SEQ = 64, 16
TIED_EMBEDDING = "embedding.word_embeddings.weight"


def _config(preset: str, **overrides):
    if preset == "gpt2":  # learned positions, tied output, biases
        return gpt2_config(4, 32, 4, **overrides)
    return llama_config(4, 32, 4, num_query_groups=2, ffn_hidden_size=48, **overrides)  # untied, SwiGLU, GQA


def _global_name(chunk, name: str, param: torch.nn.Parameter) -> str:
    """The parameter's name in the unsplit model (local layer index -> global layer number)."""
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", name)
    if match:
        return f"decoder.layers.{chunk.decoder.layers[int(match[1])].layer_number - 1}.{match[2]}"
    if name == "output_layer.weight" and getattr(param, "shared_embedding", False):
        return TIED_EMBEDDING  # the separate last stage's copy of the tied embedding
    return name


def _drawn_from(config, name: str, param: torch.nn.Parameter) -> bool:
    """Whether ``param`` is the draw of seed name ``name`` (plain or scaled output-projection std)."""
    for init in (config.init_method(name), config.output_init_method(name)):
        expected = torch.empty(param.shape, dtype=torch.float32)
        init(expected)
        if torch.equal(param.detach().float(), expected):
            return True
    return False


def _check(preset: str, pp: int, vpp, overrides: dict):
    config = _config(preset, **overrides)
    ps = parallel_state.ParallelState(1, pp, vpp)
    names, wrong = [], []
    for chunk in build_gpt_model_chunks(config, VOCAB, SEQ, ps, make_vocab_size_divisible_by=32):
        for local, p in chunk.named_parameters():
            name = _global_name(chunk, local, p)
            names.append(name)
            if p.dim() >= 2 and not _drawn_from(config, name, p):
                wrong.append(f"{local} (global {name})")
    ps.destroy()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return [n for rank_names in gathered for n in rank_names], wrong


def _serial_names(preset: str):
    ps = parallel_state.ParallelState(1, 1)
    (model,) = build_gpt_model_chunks(_config(preset), VOCAB, SEQ, ps, make_vocab_size_divisible_by=32)
    ps.destroy()
    return [name for name, _ in model.named_parameters()]


SPLITS = {  # name: (pipeline stages, virtual stages, config overrides)
    "serial": (1, None, {}),
    "pp2": (2, None, {}),
    "pp2-vpp2": (2, 2, {}),
    "pp2-uneven": (2, None, {"num_layers_in_first_pipeline_stage": 1}),
}


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_every_weight_is_drawn_from_the_seed_of_its_unsplit_name(preset, split):
    pp, vpp, overrides = SPLITS[split]
    (serial,) = run_distributed(_serial_names, 1, preset, timeout=60)
    results = run_distributed(_check, pp, preset, pp, vpp, overrides, timeout=60)
    all_names = results[0][0]
    for _, wrong in results:
        assert not wrong, f"{preset} {split}: weights not drawn from their name's seed: {wrong}"
    # Tied on separate stages, the embedding appears on the first and (as a copy) on the last stage.
    distinct = sorted(set(all_names))
    assert distinct == sorted(serial), f"{preset} {split}: {distinct} != {sorted(serial)}"
    assert len(all_names) == len(serial) + (preset == "gpt2" and pp > 1)
