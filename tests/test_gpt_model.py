"""GPTModel under tensor, sequence and pipeline parallelism and recompute, against TP=1 / PP=1 runs.

The serial model itself is checked against Hugging Face in test_hf_equivalence.py; here the
parallel layouts must reproduce it: same seeded weights, same losses over 5 AdamW steps, same
gradients, and recompute must not change a gradient even with dropout on.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist
from equivalence import assert_rel_close
from harness import run_distributed

from megatron_core import parallel_state
from megatron_core.distributed import finalize_model_grads
from megatron_core.models.gpt import GPTModel, build_gpt_model_chunks
from megatron_core.models.gpt.embedding import LanguageModelEmbedding
from megatron_core.models.presets import gpt2_config, llama_config, llama_ffn_hidden_size
from megatron_core.tensor_parallel.utils import shard_of_master

VOCAB, SEQ, BATCH, STEPS = 128, 16, 2, 5


def _config(preset, **overrides):
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    if preset == "llama":
        # GQA (4 heads, 2 groups), SwiGLU, partial RoPE, untied output layer.
        values.update(num_query_groups=2, ffn_hidden_size=96, rotary_percent=0.5)
    values.update(overrides)
    return gpt2_config(**values) if preset == "gpt2" else llama_config(**values)


def _batch(step, seq=SEQ):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (BATCH, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _shard(full, param, tp, rank):
    """This rank's slice of a TP=1 tensor, from the parameter's own partition attributes."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return shard_of_master(full, param.partition_dim, param.partition_stride, rank, tp)


def _train(config, steps, seq=SEQ):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    ps.manual_seed(7)
    model = GPTModel(config, VOCAB, seq, parallel_state=ps, make_vocab_size_divisible_by=64)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses, first_grads = [], None
    for step in range(steps):
        ids, labels = _batch(step, seq)
        loss = model(ids, labels=labels).mean()
        loss.backward()
        finalize_model_grads([model], ps)  # sums sequence-parallel grads over TP
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    attrs = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None),
                 getattr(p, "partition_stride", None), getattr(p, "sequence_parallel", False))
             for n, p in model.named_parameters()}
    return losses, init, first_grads, attrs


@pytest.mark.parametrize("preset,sp", [("gpt2", False), ("llama", False), ("gpt2", True), ("llama", True)])
def test_tp2_training_matches_tp1(preset, sp):
    (ref_losses, ref_init, ref_grads, _), = run_distributed(_train, 1, _config(preset), STEPS, timeout=90)
    results = run_distributed(_train, 2, _config(preset, sequence_parallel=sp), STEPS, timeout=90)
    for rank, (losses, init, grads, attrs) in enumerate(results):
        for name, value in init.items():
            param = torch.nn.Parameter(value)
            param.tensor_model_parallel, param.partition_dim, param.partition_stride, sp_attr = attrs[name]
            assert torch.equal(value, _shard(ref_init[name], param, 2, rank)), f"init of {name} differs from TP=1"
            assert_rel_close(grads[name], _shard(ref_grads[name], param, 2, rank), what=f"step-1 grad of {name}")
            if sp and "layernorm" in name:
                assert sp_attr, f"{name} must be marked sequence_parallel under sequence parallelism"
        assert_rel_close(torch.tensor(losses), torch.tensor(ref_losses), what=f"{preset} SP={sp} losses")
    assert ref_losses[-1] < ref_losses[0], "training should lower the loss"


@pytest.mark.parametrize("preset,backend,seq", [("gpt2", "unfused", 200), ("llama", "local", 130)])
def test_explicit_causal_blocks_under_tp2_sp_match_sdpa_at_tp1(preset, backend, seq):
    """Sequences past the explicit causal path's first 128-row query block: that path at TP=1 and at
    TP=2 with sequence parallelism against PyTorch's SDPA at TP=1 (dropout 0), gradients and 5 losses."""
    (ref_losses, _, ref_grads, _), = run_distributed(_train, 1, _config(preset), STEPS, seq, timeout=90)
    config = _config(preset, attention_backend=backend)
    layouts = {"TP=1": [run_distributed(_train, 1, config, STEPS, seq, timeout=90)[0]],
               "TP=2 SP": run_distributed(_train, 2, dataclasses.replace(config, sequence_parallel=True), STEPS, seq,
                                          timeout=90)}
    for layout, results in layouts.items():
        for rank, (losses, _, grads, attrs) in enumerate(results):
            for name, grad in grads.items():
                param = torch.nn.Parameter(grad)
                param.tensor_model_parallel, param.partition_dim, param.partition_stride, _ = attrs[name]
                expected = _shard(ref_grads[name], param, len(results), rank)
                assert_rel_close(grad, expected, what=f"{layout} rank {rank} step-1 grad of {name}")
            assert_rel_close(torch.tensor(losses), torch.tensor(ref_losses), what=f"{layout} losses")


RECOMPUTE = {"none": {}, "selective": dict(recompute_granularity="selective"),
             "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
             "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)}


def _recompute_grads(preset, backend, seq=SEQ):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    out = {}
    for mode, options in RECOMPUTE.items():
        # Dropout on, so the recomputed forward must replay the default and the TP-rank RNG streams.
        config = _config(preset, num_layers=3, hidden_dropout=0.2, attention_dropout=0.2, attention_backend=backend,
                         **options)
        model = GPTModel(config, VOCAB, seq, parallel_state=ps, make_vocab_size_divisible_by=64)
        ps.manual_seed(3)
        ids, labels = _batch(0, seq)
        loss = model(ids, labels=labels).mean()
        loss.backward()
        out[mode] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    model.eval()
    out["eval loss"] = model(ids, labels=labels).mean().item()
    return out


@pytest.mark.parametrize("preset,backend,seq", [("gpt2", "unfused", SEQ), ("llama", "flash", SEQ),
                                                ("llama", "auto", SEQ), ("llama", "auto", 140)])
def test_recompute_gives_the_same_gradients(preset, backend, seq):
    """Sequence 140: the explicit causal path's two query blocks, their dropout masks replayed."""
    for rank, out in enumerate(run_distributed(_recompute_grads, 2, preset, backend, seq, timeout=90)):
        loss, grads = out["none"]
        assert abs(out["eval loss"] - loss) > 1e-4, "dropout should change the loss (else RNG replay is untested)"
        for mode in ("selective", "full-uniform", "full-block"):
            assert out[mode][0] == pytest.approx(loss, rel=1e-6), f"{mode}: loss differs"
            for name, grad in grads.items():
                assert_rel_close(out[mode][1][name], grad, what=f"{mode} rank {rank} grad of {name}")


def _frozen_embedding_grads():
    ps = parallel_state.initialize_model_parallel(1)
    out = {}
    for mode, options in RECOMPUTE.items():
        model = GPTModel(_config("llama", num_layers=3, **options), VOCAB, SEQ, parallel_state=ps,
                         make_vocab_size_divisible_by=64)
        model.embedding.requires_grad_(False)
        ps.manual_seed(3)
        ids, labels = _batch(0)
        model(ids, labels=labels).mean().backward()
        out[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out


def test_recompute_with_a_frozen_embedding_still_trains_the_layers():
    """Full recompute checkpoints the layers as an autograd Function of the block's input; with the embedding
    frozen that input needs no gradient, and the layers' weights got none (Llama: the untied output layer trains)."""
    (out,) = run_distributed(_frozen_embedding_grads, 1, timeout=90)
    plain = out["none"]
    assert all(grad is not None for grad in plain.values()) and len(plain) > 3
    for mode in ("selective", "full-uniform", "full-block"):
        for name, grad in plain.items():
            assert out[mode][name] is not None, f"{mode}: no gradient for {name}"
            assert_rel_close(out[mode][name], grad, what=f"{mode} grad of {name}")

def _pipeline(config, pp, vpp):
    ps = parallel_state.initialize_model_parallel(1, pp, vpp)
    ps.manual_seed(5)
    chunks = build_gpt_model_chunks(config, VOCAB, SEQ, ps, make_vocab_size_divisible_by=64)
    params = []
    for chunk in chunks:
        offset = chunk.decoder.layer_offset
        for name, p in chunk.named_parameters():
            if name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers."):].split(".", 1)
                name = f"decoder.layers.{int(local) + offset}.{rest}"
            params.append((name, p.detach().clone(), getattr(p, "shared_embedding", False)))
    # Forward one microbatch through the stages by hand (chunk order: vp-major, then pipeline rank).
    ids, labels = _batch(0)
    hidden, loss = None, None
    for chunk in chunks:
        if not chunk.pre_process:
            hidden = torch.empty(SEQ, BATCH, config.hidden_size)
            dist.recv(hidden, src=ps.prev_pipeline_rank)
            chunk.set_input_tensor(hidden)
        out = chunk(ids, None, labels=labels if chunk.post_process else None)
        if chunk.post_process:
            loss = out.mean().item()
        else:
            dist.send(out.detach().contiguous(), dst=ps.next_pipeline_rank)
    return params, loss, [(c.pre_process, c.post_process) for c in chunks]


@pytest.mark.parametrize("pp,vpp,first", [(2, None, None), (2, None, 1), (2, 2, None)])
def test_pipeline_split_holds_the_same_parameters(pp, vpp, first):
    config = _config("gpt2", num_layers=4, num_layers_in_first_pipeline_stage=first)
    (ref_params, ref_loss, _), = run_distributed(_pipeline, 1, dataclasses.replace(
        config, num_layers_in_first_pipeline_stage=None), 1, None, timeout=90)
    reference = {name: value for name, value, _ in ref_params}
    assert not any(shared for _, _, shared in ref_params), "a single stage has nothing to share"
    results = run_distributed(_pipeline, pp, config, pp, vpp, timeout=90)
    seen = set()
    for rank, (params, loss, _roles) in enumerate(results):
        for name, value, shared in params:
            if name == "output_layer.weight":
                assert shared and torch.equal(value, reference["embedding.word_embeddings.weight"]), \
                    "the last stage's tied output weight must start equal to the word embedding"
                continue
            assert torch.equal(value, reference[name]), f"{name} differs from the PP=1 model"
            assert shared == (name == "embedding.word_embeddings.weight")
            seen.add(name)
        if rank == pp - 1:
            assert_rel_close(torch.tensor(loss), torch.tensor(ref_loss), what="pipelined loss")
    assert seen == set(reference), f"parameters missing from every stage: {set(reference) - seen}"
    assert results[0][2][0] == (True, False) and results[-1][2][-1] == (False, True)


def test_llama_ffn_hidden_size_gives_the_published_widths():
    """2/3 of 4h (times ffn_dim_multiplier), rounded up to multiple_of: the intermediate_size of the
    Hugging Face configs of Llama-2 7B (11008), 13B (13824), 70B (28672, multiplier 1.3, multiple_of
    4096) and Llama-3 8B (14336, 1.3, 1024); a width already a multiple stays as it is."""
    assert llama_ffn_hidden_size(4096) == 11008
    assert llama_ffn_hidden_size(5120) == 13824
    assert llama_ffn_hidden_size(8192, 4096, 1.3) == 28672
    assert llama_ffn_hidden_size(4096, 1024, 1.3) == 14336
    assert llama_ffn_hidden_size(96) == 256  # 2/3 of 384 is 256 exactly
    assert llama_config(num_layers=1).ffn_hidden_size == 11008
    assert llama_config(num_layers=1, ffn_hidden_size=96).ffn_hidden_size == 96


def _embedding_outputs(p):
    ps = parallel_state.initialize_model_parallel(1)
    ps.manual_seed(3)
    embedding = LanguageModelEmbedding(_config("gpt2", hidden_dropout=p), VOCAB, SEQ, ps)
    ids = _batch(0)[0]
    clean = embedding.eval()(ids)
    return clean, embedding.train()(ids)


def test_embedding_dropout_applies_in_training_only():
    """--hidden-dropout on the embeddings' output: in training each element is zeroed or scaled by 1/(1-p)."""
    (clean, dropped), = run_distributed(_embedding_outputs, 1, 0.5, timeout=60)
    kept = dropped != 0
    assert 0.4 < kept.float().mean().item() < 0.6, "about half the elements survive p = 0.5"
    torch.testing.assert_close(dropped[kept], 2 * clean[kept], rtol=1e-6, atol=0)


def _stage_input_forms():
    ps = parallel_state.initialize_model_parallel(1)
    ps.manual_seed(3)
    model = GPTModel(_config("gpt2", num_layers=1), VOCAB, SEQ, pre_process=False, post_process=False,
                     parallel_state=ps)
    hidden = torch.randn(SEQ, BATCH, 64)
    model.set_input_tensor(hidden)
    plain = model(None)
    model.set_input_tensor([hidden])  # Megatron-LM's schedules pass a one-element list
    as_list = model(None)
    try:
        model.set_input_tensor([hidden, hidden])
        error = ""
    except ValueError as exc:
        error = str(exc)
    return torch.equal(plain, as_list), error


def test_a_stage_takes_its_input_as_a_tensor_or_a_one_element_list():
    (same, error), = run_distributed(_stage_input_forms, 1, timeout=60)
    assert same
    assert error == "GPTModel takes one input tensor, got 2"


def _refusals():
    ps = parallel_state.initialize_model_parallel(1)
    ps.manual_seed(3)
    errors = []
    try:
        GPTModel(_config("gpt2", sequence_parallel=True), VOCAB, SEQ, parallel_state=ps)
    except ValueError as exc:  # ConfigError
        errors.append(str(exc))
    model = GPTModel(_config("gpt2", num_layers=1), VOCAB, SEQ, parallel_state=ps)
    try:
        model(torch.zeros(1, SEQ + 1, dtype=torch.long))
    except ValueError as exc:
        errors.append(str(exc))
    return errors


def test_bad_layouts_and_long_sequences_are_refused_by_name():
    errors, = run_distributed(_refusals, 1, timeout=60)
    assert errors == ["sequence_parallel=True needs --tensor-model-parallel-size > 1",
                      f"sequence length {SEQ + 1} exceeds --max-position-embeddings {SEQ}"]
