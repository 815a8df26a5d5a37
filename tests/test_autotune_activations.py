"""The autotuner's activation bytes against the tensors the framework saves for backward, counted with
``saved_tensors_hooks`` (each storage once, parameters aside): per layer, from the final norm on, and per
chunk under full recompute."""
import functools

import pytest
import torch
from harness import run_distributed
from test_autotune_memory import SEQ, _config, _spec

from megatron_core import device, parallel_state
from megatron_core.autotune.activations import (
    chunk_activation_bytes,
    document_mask_bytes,
    head_activation_bytes,
    layer_activation_bytes,
)
from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.datasets import document_attention_mask
from megatron_core.models.gpt import build_gpt_model_chunks
from megatron_core.transformer.config import TransformerConfig


def _record(params: set, seen: dict, t):
    """saved_tensors_hooks pack: remember each non-parameter storage once (views share one)."""
    if t.untyped_storage().data_ptr() not in params:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t


def _saved_bytes(kw, layers, tp, sp, mb, seq=SEQ, document_mask=False):
    """Bytes saved for backward by a GPT of ``layers`` layers (parameters aside); with ``document_mask``
    every sample holds two documents and the model gets their [b, 1, s, s] mask, as pretrain_gpt's."""
    ps = parallel_state.ParallelState(tp, 1)
    ps.manual_seed(1)
    config = TransformerConfig(num_layers=layers, hidden_size=32, num_attention_heads=4, sequence_parallel=sp, **kw)
    (model,) = build_gpt_model_chunks(config, 64, seq, ps, make_vocab_size_divisible_by=32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    pack = functools.partial(_record, params, seen)
    tokens = torch.randint(0, 63, (mb, seq))
    tokens[:, seq // 3] = 63  # an EOD (id 63) in every sample
    mask = torch.stack([document_attention_mask(t, 63) for t in tokens]) if document_mask else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, attention_mask=mask, labels=tokens).sum()
    loss.backward()  # outside the hooks: recompute's saved tensors are transient
    ps.destroy()
    return sum(seen.values())


def _saved_per_layer(kw, tp, sp, mb, seq=SEQ, document_mask=False):
    return _saved_bytes(kw, 2, tp, sp, mb, seq, document_mask) - _saved_bytes(kw, 1, tp, sp, mb, seq, document_mask)


CASES = {"dropout-explicit": dict(), "no-dropout-sdpa": dict(hidden_dropout=0.0, attention_dropout=0.0),
         "selective": dict(recompute_granularity="selective"),
         "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
         "unfused": dict(attention_backend="unfused", hidden_dropout=0.0, attention_dropout=0.0),
         "llama-rope-gqa": dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                                position_embedding_type="rope", num_query_groups=2),
         # grouped-query attention without RoPE: q is a copy of its [s, b, groups, heads/groups * d] split unless
         # one group is left on the rank (TP 2 here), k and v stay views of the fused QKV output
         "gqa-explicit": dict(num_query_groups=2), "gqa-sdpa": dict(num_query_groups=2, hidden_dropout=0.0,
                                                                    attention_dropout=0.0),
         # --qk-layernorm: the q/k norms' statistics and inputs (the fused output, the split's q copy) and new q, k
         "qk-llama-gqa": dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                              position_embedding_type="rope", num_query_groups=2, qk_layernorm=True),
         "qk-gqa-sdpa": dict(num_query_groups=2, hidden_dropout=0.0, attention_dropout=0.0, qk_layernorm=True)}


def _recompute(case: str) -> str | None:
    """The Layout.recompute of a case of CASES."""
    return case if case in ("selective", "full") else None


def _saved_per_layer_all(tp, sp, mb):
    return {case: _saved_per_layer(kw, tp, sp, mb) for case, kw in CASES.items()}


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-sp"])
def test_layer_activations_equal_saved_tensors(tp, sp):
    measured = run_distributed(_saved_per_layer_all, tp, tp, sp, 3, timeout=120)[0]
    for case, kw in CASES.items():
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, **kw)
        layout = Layout(tp=tp, micro_batch_size=3, sequence_parallel=sp,
                        recompute=_recompute(case))
        predicted = layer_activation_bytes(ModelSpec(config, 64, SEQ, SEQ, 3), layout)
        assert predicted == measured[case], f"{case} tp{tp} sp{sp}: predicted {predicted} bytes, saved {measured[case]}"


def _saved_per_layer_compiled(kw, tp, sp, mb):
    from megatron_core.fusions import compiled
    compiled.MIN_NUMEL = 1  # this forked rank: every SwiGLU input takes the compiled fusion
    return _saved_per_layer(kw, tp, sp, mb)


@pytest.mark.skipif(not device.cpu_compiler_available(), reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_compiled_swiglu_activations_equal_saved_tensors(tp, sp, dtype, monkeypatch):
    """The CPU's compiled SwiGLU keeps its input and no silu(gate): 3 s b ffn / t, not 4, in fp32 and bf16;
    fp16 stays eager on the CPU (``compiled.FUSED_DTYPES``; the model counted it fused: 12288 bytes short per
    layer at TP 1 here)."""
    from megatron_core.fusions import compiled
    kw = dict(CASES["llama-rope-gqa"], params_dtype=dtype)
    measured = run_distributed(_saved_per_layer_compiled, tp, kw, tp, sp, 3, timeout=240)[0]
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, **kw)
    spec = ModelSpec(config, 64, SEQ, SEQ, 3, bytes_per_param=dtype.itemsize)
    layout = Layout(tp=tp, micro_batch_size=3, sequence_parallel=sp)
    eager = layer_activation_bytes(spec, layout)
    monkeypatch.setattr(compiled, "MIN_NUMEL", 1)
    predicted = layer_activation_bytes(spec, layout)
    assert predicted == measured, f"tp{tp} sp{sp}: predicted {predicted} bytes, saved {measured}"
    silu_gate = 0 if dtype == torch.float16 else SEQ * 3 * config.ffn_hidden_size // tp * dtype.itemsize
    assert eager - predicted == silu_gate  # one silu(gate) less where fused


def test_blocked_causal_attention_activations_equal_saved_tensors():
    """Sequence 200: the explicit causal path's two query blocks (128 + 72 rows) keep 128 x 128 and
    72 x 200 scores, not 200 x 200."""
    measured = run_distributed(_saved_per_layer, 1, CASES["dropout-explicit"], 1, False, 1, 200, timeout=120)[0]
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4)
    predicted = layer_activation_bytes(ModelSpec(config, 64, 200, 200, 3), Layout(tp=1, micro_batch_size=1))
    assert predicted == measured, f"predicted {predicted} bytes, saved {measured}"


DOCUMENT_CASES = ("dropout-explicit", "no-dropout-sdpa", "selective", "full", "unfused")


def _saved_with_document_mask(seq, params_dtype):
    """Per case: (bytes per layer with a document mask, bytes a 1-layer model saves beyond the same model
    without the mask)."""
    out = {}
    for case in DOCUMENT_CASES:
        kw = dict(CASES[case], params_dtype=params_dtype)
        one = _saved_bytes(kw, 1, 1, False, 3, seq, document_mask=True)
        out[case] = (_saved_bytes(kw, 2, 1, False, 3, seq, document_mask=True) - one,
                     one - _saved_bytes(kw, 1, 1, False, 3, seq))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_document_mask_activations_equal_saved_tensors(dtype):
    """--reset-attention-mask at sequence 200: the explicit path computes all 200 x 200 scores (not the
    causal blocks), SDPA keeps one additive form of the mask per micro batch, shared by the layers (one per
    layer before SharedAdditiveMask: this test then failed for the SDPA case, 480,000 bytes per layer more
    than predicted), and the bool mask is kept once per micro batch by the explicit path and the recompute
    checkpoints. Before ModelSpec.document_mask the
    autotuner predicted the causal path's bytes for these runs (1.36 MB less per layer with dropout).
    Compared per layer and as the excess over the run without the mask (which adds the bool mask)."""
    measured = run_distributed(_saved_with_document_mask, 1, 200, dtype, timeout=240)[0]
    nbytes = torch.finfo(dtype).bits // 8
    for case in DOCUMENT_CASES:
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, params_dtype=dtype,
                                   **CASES[case])
        layout = Layout(micro_batch_size=3, recompute=_recompute(case))
        spec = functools.partial(ModelSpec, config, 64, 200, 200, 3, bytes_per_param=nbytes)
        masked, plain = spec(document_mask=True), spec()
        per_layer, extra = measured[case]
        predicted = layer_activation_bytes(masked, layout)
        assert predicted == per_layer, f"{case} {dtype}: predicted {predicted} bytes per layer, saved {per_layer}"
        predicted = predicted - layer_activation_bytes(plain, layout) + document_mask_bytes(masked, layout)
        assert predicted == extra, f"{case} {dtype}: predicted {predicted} more bytes with the mask, saved {extra}"


def _saved_bf16(cases, seq):
    return [_saved_per_layer(dict(CASES[case], params_dtype=torch.bfloat16), 1, False, 1, seq) for case in cases]


def test_bf16_explicit_attention_over_sdpa_equals_saved_tensors():
    """bf16, no dropout, sequence 200: the explicit causal path keeps the fp32 softmax and its bf16 copy
    (the operand of the product with v) per block. Compared in full and as the explicit path's excess
    over SDPA."""
    cases = ("unfused", "no-dropout-sdpa")
    explicit, sdpa = run_distributed(_saved_bf16, 1, cases, 200, timeout=120)[0]
    spec = functools.partial(ModelSpec, seq_length=200, max_position_embeddings=200, global_batch_size=1,
                             vocab_size=64, bytes_per_param=2)
    predicted = [layer_activation_bytes(spec(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                                               params_dtype=torch.bfloat16, **CASES[case])),
                                        Layout(tp=1, micro_batch_size=1)) for case in cases]
    assert predicted == [explicit, sdpa], f"predicted {predicted} bytes per layer, saved {[explicit, sdpa]}"
    assert predicted[0] - predicted[1] == explicit - sdpa, \
        f"predicted excess {predicted[0] - predicted[1]} bytes, saved {explicit - sdpa}"


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_one_causal_block_keeps_the_full_scores_of_a_fused_softmax(llama):
    """Up to CAUSAL_BLOCK positions the CPU's blocked causal path is one block over all s x s scores,
    so its prediction equals the GPU's under the "fused" backend (no dropout: no mask either way),
    but for the GPU's fused SwiGLU kernel, which keeps no silu(gate) (these tiny CPU inputs take
    SwiGLU as torch ops)."""
    spec = _spec(_config(llama, attention_backend="fused"))
    for layout in (Layout(dp=4), Layout(tp=2, dp=2, micro_batch_size=2)):
        silu_gate = SEQ * layout.micro_batch_size * spec.ffn_hidden_size // layout.tp * 4 if llama else 0
        assert layer_activation_bytes(spec, layout, on_cpu=False) == \
            layer_activation_bytes(spec, layout, on_cpu=True) - silu_gate


def _saved_by_head(tp, sp, mb, kw):
    """Bytes of the tensors saved from the final norm on (final norm, output layer, loss): a forward
    pre-hook on the final norm switches the count on."""
    ps = parallel_state.ParallelState(tp, 1)
    ps.manual_seed(1)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, sequence_parallel=sp, **kw)
    (model,) = build_gpt_model_chunks(config, 64, SEQ, ps, make_vocab_size_divisible_by=32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    counting = []
    model.decoder.final_layernorm.register_forward_pre_hook(lambda *_: counting.append(True))

    def pack(t):
        return _record(params, seen, t) if counting else t

    tokens = torch.randint(0, 64, (mb, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, labels=tokens).sum()
    loss.backward()
    ps.destroy()
    return sum(seen.values())


HEAD_CASES = {"layernorm": {}, "rmsnorm": dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False)}


def _saved_by_head_all(tp, sp, mb):
    return {case: _saved_by_head(tp, sp, mb, kw) for case, kw in HEAD_CASES.items()}


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-sp"])
def test_head_activations_equal_saved_tensors(tp, sp):
    """The final norm, output layer and loss. Under TP 2 with sequence parallelism the norm's input and
    output are [s/2, b, h] shards (the output layer keeps its local input and re-gathers it in backward):
    the formula once counted the gathered [s, b, h] input, 6144 bytes too many here."""
    measured = run_distributed(_saved_by_head_all, tp, tp, sp, 3, timeout=120)[0]
    for case, kw in HEAD_CASES.items():
        spec = ModelSpec(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, **kw), 64, SEQ, SEQ,
                         3, make_vocab_size_divisible_by=32)
        predicted = head_activation_bytes(spec, Layout(tp=tp, micro_batch_size=3, sequence_parallel=sp))
        assert predicted == measured[case], f"{case} tp{tp} sp{sp}: predicted {predicted} bytes, saved {measured[case]}"


FP32_RESIDUAL_CASES = ("dropout-explicit", "selective", "full", "llama-rope-gqa")


def _saved_fp32_residual(tp, sp, mb):
    """bf16 bytes per layer and from the final norm on, without and with --fp32-residual-connection."""
    out = {}
    for flag in (False, True):
        for case in FP32_RESIDUAL_CASES:
            kw = dict(CASES[case], params_dtype=torch.bfloat16, fp32_residual_connection=flag)
            out[case, flag] = _saved_per_layer(kw, tp, sp, mb)
        for case, kw in HEAD_CASES.items():
            out["head", case, flag] = _saved_by_head(tp, sp, mb, dict(kw, params_dtype=torch.bfloat16,
                                                                       fp32_residual_connection=flag))
    return out


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_fp32_residual_activations_equal_saved_tensors(tp, sp):
    """bf16 with --fp32-residual-connection: the layer input and the residual sum are fp32 (and, under
    full recompute, the checkpointed layer input), the final norm's input too, and every norm keeps fp32
    copies of its bf16 weights; RMSNorm keeps ``x * rstd`` in fp32 then. Compared in full, with and without
    the flag. Before, the autotuner predicted the same bytes as without the flag (6656 bytes per layer short
    here at TP 1)."""
    measured = run_distributed(_saved_fp32_residual, tp, tp, sp, 3, timeout=300)[0]
    layout = functools.partial(Layout, tp=tp, micro_batch_size=3, sequence_parallel=sp)

    def spec(kw, flag):
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, params_dtype=torch.bfloat16,
                                   fp32_residual_connection=flag, **kw)
        return ModelSpec(config, 64, SEQ, SEQ, 3, make_vocab_size_divisible_by=32, bytes_per_param=2)

    for case in FP32_RESIDUAL_CASES:
        lay = layout(recompute=_recompute(case))
        plain, fp32 = (layer_activation_bytes(spec(CASES[case], flag), lay) for flag in (False, True))
        for flag, predicted in ((False, plain), (True, fp32)):
            saved = measured[case, flag]
            assert predicted == saved, f"{case} flag={flag}: predicted {predicted} bytes per layer, saved {saved}"
    for case, kw in HEAD_CASES.items():
        for flag in (False, True):
            predicted, saved = head_activation_bytes(spec(kw, flag), layout()), measured["head", case, flag]
            assert predicted == saved, f"head {case} flag={flag}: predicted {predicted} bytes, saved {saved}"


def _saved_low_precision(dtype, tp, sp, mb):
    """Bytes per layer of every case of CASES, and from the final norm on for HEAD_CASES, in ``dtype``."""
    out = {case: _saved_per_layer(dict(kw, params_dtype=dtype), tp, sp, mb) for case, kw in CASES.items()}
    out.update({("head", case): _saved_by_head(tp, sp, mb, dict(kw, params_dtype=dtype))
                for case, kw in HEAD_CASES.items()})
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_low_precision_activations_equal_saved_tensors(dtype, tp, sp):
    """bf16/fp16 on the CPU, absolute bytes per layer and from the final norm on (not only excesses over
    another run): the torch RMSNorm normalises an fp32 copy of its input (and keeps that copy, not the
    input), the CPU's LayerNorm keeps its statistics in the input's dtype, and RoPE casts the fp32 cos/sin
    tables to the activations' dtype for each of q and k (4 copies [s, b, 1, rotary_dim] per layer). Before,
    the autotuner predicted 101760 bytes for the Llama layer at TP 1, which saves 110976, and 384 bytes too
    many for each GPT-2 layer (fp32 LayerNorm statistics)."""
    measured = run_distributed(_saved_low_precision, tp, dtype, tp, sp, 3, timeout=300)[0]
    layout = functools.partial(Layout, tp=tp, micro_batch_size=3, sequence_parallel=sp)

    def spec(kw):
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, params_dtype=dtype, **kw)
        return ModelSpec(config, 64, SEQ, SEQ, 3, make_vocab_size_divisible_by=32, bytes_per_param=dtype.itemsize)

    for case, kw in CASES.items():
        predicted = layer_activation_bytes(spec(kw), layout(recompute=_recompute(case)))
        assert predicted == measured[case], f"{case}: predicted {predicted} bytes per layer, saved {measured[case]}"
    for case, kw in HEAD_CASES.items():
        predicted = head_activation_bytes(spec(kw), layout())
        saved = measured["head", case]
        assert predicted == saved, f"head {case}: predicted {predicted} bytes, saved {saved}"


# (method, recompute_num_layers) on a chunk of 4 layers: groups of 1, 2, 3 + 1; the first 1 or 3 layers alone
RECOMPUTE_METHODS = [("uniform", 1), ("uniform", 2), ("uniform", 3), ("block", 1), ("block", 3)]


def _saved_by_decoder(kw, layers, mb, document_mask=False):
    """(bytes the decoder's layers save in forward, bytes saved while each layer is recomputed in backward):
    pre-hooks on the decoder and its final norm switch the forward count on and off; in backward the
    checkpoint's replay runs the layers' forward again, and what it saves is counted per layer. With
    ``document_mask`` every sample holds two documents and the model gets their [b, 1, s, s] mask."""
    ps = parallel_state.ParallelState(1, 1)
    ps.manual_seed(1)
    config = TransformerConfig(num_layers=layers, hidden_size=32, num_attention_heads=4, **kw)
    (model,) = build_gpt_model_chunks(config, 64, SEQ, ps, make_vocab_size_divisible_by=32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where: list = [None]  # "forward" while the layers run forward, then the layer replayed in backward
    forward: dict[int, int] = {}
    replayed: list[dict[int, int]] = [{} for _ in range(layers)]
    model.decoder.register_forward_pre_hook(lambda *_: where.__setitem__(0, "forward"))
    model.decoder.final_layernorm.register_forward_pre_hook(lambda *_: where.__setitem__(0, None))
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i) if where[0] != "forward" else None)

    def pack(t):
        if where[0] == "forward":
            return _record(params, forward, t)
        return _record(params, replayed[where[0]], t) if isinstance(where[0], int) else t

    tokens = torch.randint(0, 64, (mb, SEQ))
    mask = None
    if document_mask:
        tokens[:, SEQ // 3] = 63  # an EOD (id 63) in every sample
        mask = document_attention_mask(tokens, 63)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, attention_mask=mask, labels=tokens).sum()
        where[0] = "backward"
        loss.backward()
    ps.destroy()
    return sum(forward.values()), replayed


def _union_bytes(replayed, layers) -> int:
    """Bytes saved by the replays of ``layers`` together: a storage two of them save (a mask's additive form)
    counts once."""
    return sum({ptr: n for i in layers for ptr, n in replayed[i].items()}.values())


def _saved_by_decoder_all(dtype):
    return {(method, k): _saved_by_decoder(dict(CASES["full"], recompute_method=method, recompute_num_layers=k,
                                                params_dtype=dtype), 4, 3)
            for method, k in RECOMPUTE_METHODS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_recompute_methods_equal_saved_tensors(dtype):
    """A chunk of 4 layers under full recompute: the forward keeps one input per checkpointed group (uniform)
    or per checkpointed layer plus every activation of the others (block), and backward replays one group at
    a time: the most bytes one replay saves equal the predicted transient. Before, every full recompute was
    counted as uniform with one layer per checkpoint (uniform 2: one input too many and one layer's
    replay too few)."""
    measured = run_distributed(_saved_by_decoder_all, 1, dtype, timeout=240)[0]
    config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, params_dtype=dtype, **CASES["full"])
    spec = ModelSpec(config, 64, SEQ, SEQ, 3, bytes_per_param=dtype.itemsize)
    for method, k in RECOMPUTE_METHODS:
        layout = Layout(micro_batch_size=3, recompute="full", recompute_method=method, recompute_num_layers=k)
        forward, replayed = measured[method, k]
        groups = [range(s, min(s + k, 4)) for s in range(0, 4, k)] if method == "uniform" else [[i] for i in range(k)]
        assert all(not replayed[i] for i in range(4) if not any(i in g for g in groups)), (method, k, replayed)
        rebuilt = max(_union_bytes(replayed, g) for g in groups)
        assert chunk_activation_bytes(spec, layout, 4) == (forward, rebuilt), \
            f"{method} {k}: predicted {chunk_activation_bytes(spec, layout, 4)}, saved {(forward, rebuilt)}"


def _saved_by_sdpa_decoder_with_document_mask():
    kw = dict(CASES["no-dropout-sdpa"], recompute_granularity="full")
    return {(method, k): _saved_by_decoder(dict(kw, recompute_method=method, recompute_num_layers=k), 4, 3, True)
            for method, k in RECOMPUTE_METHODS}


def test_full_recompute_methods_with_a_document_mask_under_sdpa_equal_saved_tensors():
    """--reset-attention-mask under SDPA and full recompute, a chunk of 4 layers: the checkpoints keep the bool
    mask; block's layers past the first recompute_num_layers run in one scope and share one additive form of it
    (each made its own before: block 1 kept three, this test failed), and each replay in backward makes the
    additive form again for its group. Forward: the chunk's kept bytes and document_mask_bytes; replay: the
    rebuilt bytes."""
    measured = run_distributed(_saved_by_sdpa_decoder_with_document_mask, 1, timeout=240)[0]
    config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, **CASES["no-dropout-sdpa"],
                               recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    spec = ModelSpec(config, 64, SEQ, SEQ, 3, document_mask=True)
    for method, k in RECOMPUTE_METHODS:
        layout = Layout(micro_batch_size=3, recompute="full", recompute_method=method, recompute_num_layers=k)
        forward, replayed = measured[method, k]
        groups = [range(s, min(s + k, 4)) for s in range(0, 4, k)] if method == "uniform" else [[i] for i in range(k)]
        kept, rebuilt = chunk_activation_bytes(spec, layout, 4)
        predicted = (kept + document_mask_bytes(spec, layout, layers=4), rebuilt)
        saved = (forward, max(_union_bytes(replayed, g) for g in groups))
        assert predicted == saved, f"{method} {k}: predicted {predicted}, saved {saved}"
