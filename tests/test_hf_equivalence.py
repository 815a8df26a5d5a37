"""GPTModel against Hugging Face GPT-2 and Llama (GQA + RoPE) with the same random weights.

Logits, the loss and every parameter gradient of one step within fp32 relative 1e-5 element-wise
(``equivalence.assert_rel_close``), at TP 1 and 2, through both core-attention paths (SDPA and the
explicit softmax). The expected gradients of that check pass through the converter under test, so
at TP 1 the gradients of one layer (and the embeddings and final norm) are also compared with the
Hugging Face gradients mapped by hand, independently of ``megatron_core.checkpoint``.
"""
import pytest
import torch
import torch.distributed as dist
from equivalence import assert_rel_close
from harness import run_distributed

from megatron_core import parallel_state
from megatron_core.checkpoint.sharding import rank_state_dict
from megatron_core.models.gpt import GPTModel
from tests.hf_testing import core_config_of, hf_tensors_to_core, load_hf_weights, tiny_hf_gpt2, tiny_hf_llama

BATCH, SEQ = 2, 16
BUILDERS = {"gpt2": tiny_hf_gpt2, "llama": tiny_hf_llama}

# Our name -> (HF name, transposed?) for parameters whose layout needs no fusing: HF GPT-2's Conv1D
# stores [in, out], our linears [out, in]; Llama's nn.Linear layouts are ours.
HAND_MAPPED = {
    "gpt2": {"embedding.word_embeddings.weight": ("transformer.wte.weight", False),
             "embedding.position_embeddings.weight": ("transformer.wpe.weight", False),
             "decoder.layers.1.input_layernorm.weight": ("transformer.h.1.ln_1.weight", False),
             "decoder.layers.1.input_layernorm.bias": ("transformer.h.1.ln_1.bias", False),
             "decoder.layers.1.self_attention.linear_proj.weight": ("transformer.h.1.attn.c_proj.weight", True),
             "decoder.layers.1.self_attention.linear_proj.bias": ("transformer.h.1.attn.c_proj.bias", False),
             "decoder.layers.1.pre_mlp_layernorm.weight": ("transformer.h.1.ln_2.weight", False),
             "decoder.layers.1.mlp.linear_fc1.weight": ("transformer.h.1.mlp.c_fc.weight", True),
             "decoder.layers.1.mlp.linear_fc1.bias": ("transformer.h.1.mlp.c_fc.bias", False),
             "decoder.layers.1.mlp.linear_fc2.weight": ("transformer.h.1.mlp.c_proj.weight", True),
             "decoder.final_layernorm.weight": ("transformer.ln_f.weight", False)},
    "llama": {"embedding.word_embeddings.weight": ("model.embed_tokens.weight", False),
              "output_layer.weight": ("lm_head.weight", False),
              "decoder.layers.1.input_layernorm.weight": ("model.layers.1.input_layernorm.weight", False),
              "decoder.layers.1.self_attention.linear_proj.weight": ("model.layers.1.self_attn.o_proj.weight", False),
              "decoder.layers.1.pre_mlp_layernorm.weight": ("model.layers.1.post_attention_layernorm.weight", False),
              "decoder.layers.1.mlp.linear_fc2.weight": ("model.layers.1.mlp.down_proj.weight", False),
              "decoder.final_layernorm.weight": ("model.norm.weight", False)},
}


def _batch(vocab, seq=SEQ):
    ids = torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(11))
    # Our model predicts labels[t] at position t; HF shifts internally. The last position has no target.
    labels = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], dim=1)
    return ids, labels


def _ours(hf_model, backend, divisible_by, seq=SEQ):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    ps.manual_seed(123)
    config, vocab, positions = core_config_of(hf_model, attention_backend=backend)
    model = GPTModel(config, vocab, positions, parallel_state=ps, make_vocab_size_divisible_by=divisible_by)
    load_hf_weights(model, hf_model, divisible_by, ps)
    ids, labels = _batch(vocab, seq)
    logits = model(ids).contiguous().detach()
    loss = model(ids, labels=labels).sum() / (BATCH * (seq - 1))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits, loss.detach(), grads, model.padded_vocab_size


def _reference(hf_model, vocab, seq=SEQ):
    ids, _ = _batch(vocab, seq)
    hf_model.zero_grad()
    out = hf_model(ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad for name, p in hf_model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("kind,tp,backend,seq", [("gpt2", 1, "auto", SEQ), ("gpt2", 2, "auto", SEQ),
                                                 ("llama", 1, "auto", SEQ), ("llama", 2, "auto", SEQ),
                                                 ("gpt2", 2, "unfused", SEQ), ("llama", 2, "fused", SEQ),
                                                 ("llama", 1, "unfused", 150), ("gpt2", 2, "local", 260)])
def test_logits_loss_and_grads_match_hf(kind, tp, backend, seq):
    """Sequences 150 and 260: the explicit causal path's 128-row query blocks (2 and 3 of them)."""
    hf_model = BUILDERS[kind](positions=max(seq, 32))
    config, vocab, _ = core_config_of(hf_model)
    ref_logits, ref_loss, ref_grads = _reference(hf_model, vocab, seq)
    full_grads = hf_tensors_to_core(hf_model, ref_grads, config)
    results = run_distributed(_ours, tp, hf_model, backend, 128, seq, timeout=90)
    logits = torch.cat([r[0] for r in results], dim=-1)
    assert results[0][3] == vocab, "test vocabulary should need no padding"
    assert_rel_close(logits, ref_logits, what=f"{kind} TP={tp} logits")
    if tp == 1:
        for ours, (theirs, transposed) in HAND_MAPPED[kind].items():
            expected = ref_grads[theirs].t() if transposed else ref_grads[theirs]
            assert_rel_close(results[0][2][ours], expected, what=f"{kind} grad of {ours} vs HF {theirs} (by hand)")
    for rank, (_, loss, grads, _) in enumerate(results):
        assert_rel_close(loss, ref_loss, what=f"loss rank {rank}")
        expected = rank_state_dict(full_grads, config, vocab, 128, tp, rank)
        assert sorted(grads) == sorted(expected), "parameter names differ from the converted HF layout"
        for name, grad in grads.items():
            assert_rel_close(grad, expected[name], what=f"{kind} TP={tp} rank {rank} grad of {name}")


def test_padded_vocabulary_logits_match_hf():
    """250 tokens padded to 256 for TP=2: the real vocabulary's logits are unchanged."""
    hf_model = tiny_hf_gpt2(vocab_size=250)
    ref_logits, _, _ = _reference(hf_model, 250)
    results = run_distributed(_ours, 2, hf_model, "auto", 8, timeout=90)
    assert results[0][3] == 256
    logits = torch.cat([r[0] for r in results], dim=-1)[..., :250]
    assert_rel_close(logits, ref_logits, what="padded-vocabulary logits")


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


@pytest.mark.parametrize("rope,tp", [(LLAMA3_ROPE, 1), (LLAMA3_ROPE, 2), (LINEAR_ROPE, 2)],
                         ids=["llama3-tp1", "llama3-tp2", "linear-tp2"])
def test_scaled_rope_logits_and_grads_match_hf(rope, tp):
    """Llama 3.x's RoPE scaling (rope_type llama3: heads of 16 channels at theta 500000 have wavelengths
    above 8192, which it divides by 8) and linear interpolation import from the config and give HF's
    logits and gradients; the export writes the same rope_parameters back."""
    from megatron_core.checkpoint import hf_llama

    seq = 128  # longer than SEQ: the scaled low frequencies turn by more
    hf_model = tiny_hf_llama(hidden=64, heads=4, kv_heads=2, positions=seq, rope_parameters=dict(rope))
    config, vocab, _ = core_config_of(hf_model)
    assert (config.rope_scaling, config.seq_len_interpolation_factor) == (
        (True, None) if rope["rope_type"] == "llama3" else (False, 4.0))
    ref_logits, ref_loss, ref_grads = _reference(hf_model, vocab, seq)
    plain = tiny_hf_llama(hidden=64, heads=4, kv_heads=2, positions=seq,
                          rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]})
    plain.load_state_dict(hf_model.state_dict())
    change = ((plain(_batch(vocab, seq)[0]).logits - ref_logits).abs() / ref_logits.abs().clamp(min=1e-2)).max()
    assert change > 1e-3  # the scaling changes the logits far beyond the comparison's 1e-5
    results = run_distributed(_ours, tp, hf_model, "auto", 128, seq, timeout=90)
    assert_rel_close(torch.cat([r[0] for r in results], dim=-1), ref_logits, what=f"{rope['rope_type']} logits")
    full_grads = hf_tensors_to_core(hf_model, ref_grads, config)
    for rank, (_, loss, grads, _) in enumerate(results):
        assert_rel_close(loss, ref_loss, what=f"loss rank {rank}")
        expected = rank_state_dict(full_grads, config, vocab, 128, tp, rank)
        for name, grad in grads.items():
            assert_rel_close(grad, expected[name], what=f"rank {rank} grad of {name}")
    exported = hf_llama.config_to_hf(config, vocab, hf_model.config.max_position_embeddings)
    assert exported.rope_parameters == rope


def test_other_rope_scalings_are_refused_in_one_line():
    from megatron_core.checkpoint.hf_errors import UnsupportedModel

    for rope, needle in [({**LLAMA3_ROPE, "high_freq_factor": 2.0}, "'high_freq_factor': 2.0"),
                         ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}, "'yarn'")]:
        with pytest.raises(UnsupportedModel, match=needle):
            core_config_of(tiny_hf_llama(rope_parameters=rope))
