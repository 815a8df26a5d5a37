"""AutoTP 2 x DP 2 on Hugging Face GPT-2 and Llama (4 ranks) against the plain PyTorch loop.

Each rank's losses must equal the one-process loop's, and the checkpoint consolidated across TP and DP
ranks must equal the loop's final state dict in Hugging Face's layout (fp32, relative 1e-5; AdamW with
eps 1e-4 for the Adam caveat stated in ``engine_common``). A bad AutoTP size is a one-line error.
"""

import os

import pytest
import torch
from engine_common import VOCAB, ds_config, make_model, reference, run_steps
from equivalence import assert_rel_close
from harness import RankError, run_distributed

import megatron_core
from megatron_core.engine.consolidate import consolidate_state_dict

STEPS, GA = 3, 2


def _train(directory, kind, stages):
    out = {}
    for stage in stages:
        config = ds_config(2, GA, stage, kind, tensor_parallel={"autotp_size": 2})
        engine, _, _, _ = megatron_core.initialize(make_model(kind), config=config)
        losses, norms = run_steps(kind, engine, 0, STEPS)
        engine.save_checkpoint(os.path.join(directory, f"zero{stage}"))
        out[stage] = (losses, norms, engine.parallel_state.dp_rank, tuple(engine.module.lm_head.weight.shape))
        engine.parallel_state.destroy()
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_autotp_equals_plain_pytorch_loop(tmp_path, kind):
    stages = (0, 2)
    (ref,) = run_distributed(reference, 1, kind, STEPS, 2 * GA, timeout=120)
    results = run_distributed(_train, 4, str(tmp_path), kind, stages, timeout=240)
    for stage in stages:
        for rank, res in enumerate(results):
            losses, norms, dp_rank, head = res[stage]
            # lm_head is sharded over the vocabulary too (tied to the embedding or not), not left whole.
            assert head == (VOCAB // 2, 32), f"{kind} zero{stage} rank {rank} lm_head {head}"
            mine = [[step[k * 2 + dp_rank] for k in range(GA)] for step in ref["losses"]]
            assert_rel_close(torch.tensor(losses), torch.tensor(mine), 1e-5, f"{kind} zero{stage} rank {rank} losses")
            assert_rel_close(torch.tensor(norms), torch.tensor(ref["norms"]), 1e-5, f"{kind} zero{stage} norms")
        state, _ = consolidate_state_dict(str(tmp_path / f"zero{stage}"))
        assert set(state) == set(ref["state"])
        for name, value in ref["state"].items():
            assert_rel_close(state[name], value, 1e-5, f"{kind} zero{stage} consolidated {name}")


def _bad_size():
    megatron_core.initialize(make_model("gpt2"), config=ds_config(1, 1, 0, "gpt2", tensor_parallel={"autotp_size": 3}))


def _mlp_autotp():
    megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 0, tensor_parallel={"autotp_size": 2}))


def test_autotp_errors():
    with pytest.raises(RankError, match="autotp_size 3 does not divide the 4 ranks"):
        run_distributed(_bad_size, 4, timeout=120)
    with pytest.raises(
        RankError, match="supports Hugging Face causal LMs of type gpt2, llama; this model is Sequential"
    ):
        run_distributed(_mlp_autotp, 2, timeout=120)


def _autotp_error(kind: str) -> str:
    """The one-line ConfigError of AutoTP 2 on a model it cannot split (raised on every rank)."""
    from hf_testing import tiny_hf_gpt2, tiny_hf_llama
    from transformers import GPT2Model

    from megatron_core.errors import ConfigError

    model = {"gpt2-3-heads": lambda: tiny_hf_gpt2(vocab_size=VOCAB, hidden=24, layers=1, heads=3, positions=16),
             "llama-3-heads": lambda: tiny_hf_llama(vocab_size=VOCAB, hidden=24, layers=1, heads=3, kv_heads=3,
                                                    ffn=32, positions=16),
             "llama-1-kv-head": lambda: tiny_hf_llama(vocab_size=VOCAB, hidden=32, layers=1, heads=4, kv_heads=1,
                                                      ffn=32, positions=16),
             "gpt2-no-lm-head": lambda: GPT2Model(tiny_hf_gpt2(vocab_size=VOCAB, hidden=32, layers=1, heads=4,
                                                               positions=16).config)}[kind]()
    try:
        megatron_core.initialize(model, config=ds_config(1, 1, 0, tensor_parallel={"autotp_size": 2}))
    except ConfigError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("kind,message", [
    ("gpt2-3-heads", "autotp_size 2 does not divide the model's attention heads (3)"),
    ("llama-3-heads", "autotp_size 2 does not divide the model's attention heads (3)"),
    ("llama-1-kv-head", "autotp_size 2 does not divide the model's key/value heads (1)"),
    ("gpt2-no-lm-head", "supports Hugging Face causal LMs of type gpt2, llama; this model is gpt2"),
])
def test_autotp_refuses_a_model_it_cannot_split(kind, message):
    """Heads (or key/value heads) that the AutoTP size does not divide, and a GPT-2 without its LM head."""
    for error in run_distributed(_autotp_error, 2, kind, timeout=120):
        assert message in error and "\n" not in error, error
