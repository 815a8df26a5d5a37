"""Unit checks of the transformer parts: config validation, specs, RoPE, core attention, norms."""
import math

import pytest
import torch
import torch.distributed as dist
from equivalence import assert_rel_close
from harness import run_distributed

from megatron_core import parallel_state
from megatron_core.fusions import LayerNorm, RMSNorm, dropout, dropout_add, scaled_masked_softmax
from megatron_core.models.gpt import GPTModel
from megatron_core.models.presets import llama_config
from megatron_core.transformer import (
    MLP,
    ConfigError,
    DotProductAttention,
    ModuleSpec,
    RotaryEmbedding,
    TransformerConfig,
    apply_rotary_pos_emb,
    get_gpt_layer_local_spec,
    get_gpt_layer_spec,
    get_gpt_layer_te_spec,
    te_spec,
)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_attention_heads=4, num_query_groups=3), r"num_query_groups \(3\) must divide num_attention_heads \(4\)"),
    (dict(hidden_size=66, num_attention_heads=4), r"hidden_size \(66\).*set kv_channels"),
    (dict(activation="gelu_fast"), "activation='gelu_fast' is not one of"),
    (dict(normalization="BatchNorm"), "normalization='BatchNorm'"),
    (dict(position_embedding_type="rope", rotary_percent=1.5), r"rotary_percent must be in \(0, 1\]"),
    (dict(recompute_granularity="full"), "needs recompute_method 'uniform' or 'block'"),
    (dict(recompute_granularity="full", recompute_method="uniform"), "needs recompute_num_layers"),
    (dict(recompute_method="block"), "apply only with recompute_granularity='full'"),
    (dict(hidden_dropout=1.0), r"hidden_dropout must be in \[0, 1\)"),
    (dict(attention_backend="flash3"), "attention_backend='flash3' is not one of"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (dict(position_embedding_type="rope", rotary_percent=0.0), r"rotary_percent must be in \(0, 1\], got 0.0"),
])
def test_config_errors_name_the_fields(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**kwargs)


def test_parallel_validation_and_round_trip():
    config = TransformerConfig(num_layers=4, num_attention_heads=4, num_query_groups=2, params_dtype=torch.bfloat16)
    config.validate_parallel(2, 2)
    message = r"num_query_groups \(2\) is not divisible by --tensor-model-parallel-size \(4\)"
    with pytest.raises(ConfigError, match=message):
        config.validate_parallel(4)
    with pytest.raises(ValueError, match="--num-layers 4 does not split evenly"):
        config.validate_parallel(1, 3)
    with pytest.raises(ConfigError, match="sequence_parallel=True needs"):
        TransformerConfig(sequence_parallel=True).validate_parallel(1)
    saved = config.to_dict()
    assert saved["params_dtype"] == "bfloat16" and all(not isinstance(v, torch.dtype) for v in saved.values())
    assert TransformerConfig.from_dict(saved) == config
    with pytest.raises(ConfigError, match=r"unknown TransformerConfig fields \['nope'\]"):
        TransformerConfig.from_dict({**saved, "nope": 1})


def test_transformer_engine_absence_is_handled():
    assert not te_spec.HAVE_TE  # cannot be installed on the development machine
    with pytest.raises(ImportError, match="needs transformer_engine"):
        get_gpt_layer_te_spec()
    assert get_gpt_layer_spec().module is get_gpt_layer_local_spec().module


def test_rope_encodes_relative_positions():
    """<R(p) q, R(p') k> depends only on p - p'; channels beyond the rotary fraction pass through."""
    rope = RotaryEmbedding(rotary_dim=8, base=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 12, generator=g), torch.randn(1, 1, 1, 12, generator=g)

    def dot(p, p2):
        qr = apply_rotary_pos_emb(q, rope(torch.tensor([[p]])))
        kr = apply_rotary_pos_emb(k, rope(torch.tensor([[p2]])))
        assert torch.equal(qr[..., 8:], q[..., 8:])
        # The rotated part is the whole-head rotation of those channels (HF Llama's, test_hf_equivalence).
        assert torch.equal(qr[..., :8], apply_rotary_pos_emb(q[..., :8].clone(), rope(torch.tensor([[p]]))))
        assert torch.allclose(qr.norm(), q.norm(), atol=1e-6)
        return (qr[..., :8] * kr[..., :8]).sum()

    assert torch.allclose(dot(3, 1), dot(12, 10), atol=1e-5)
    assert not torch.allclose(dot(3, 1), dot(3, 2), atol=1e-3)


def _naive_attention(q, k, v, mask):
    """Loop over heads; query head i reads key/value head i // (heads / groups)."""
    s, b, heads, d = q.shape
    per_group = heads // k.shape[2]
    out = torch.empty(s, b, heads, d, dtype=q.dtype)
    for i in range(heads):
        scores = torch.einsum("sbd,tbd->bst", q[:, :, i], k[:, :, i // per_group]) / math.sqrt(d)
        scores = scores.masked_fill(mask[:, 0], float("-inf"))
        out[:, :, i] = torch.einsum("bst,tbd->sbd", scores.softmax(-1), v[:, :, i // per_group])
    return out.reshape(s, b, heads * d)


def _attention(backend, explicit_mask, groups=2):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    config = TransformerConfig(hidden_size=32, num_attention_heads=4, num_query_groups=groups,
                               attention_backend=backend)
    attn = DotProductAttention(config, layer_number=1, parallel_state=ps).eval()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(8, 2, 4, 8, generator=g)
    k, v = torch.randn(8, 2, groups, 8, generator=g), torch.randn(8, 2, groups, 8, generator=g)
    causal = torch.ones(8, 8, dtype=torch.bool).triu(1).expand(2, 1, 8, 8).clone()
    mask = causal.clone()
    if explicit_mask:  # two documents per sample: no attention across the boundary at position 4
        mask[:, :, 4:, :4] = True
    return attn(q, k, v, mask if explicit_mask else None), _naive_attention(q, k, v, mask)


@pytest.mark.parametrize("backend", ["auto", "unfused", "fused"])
@pytest.mark.parametrize("explicit_mask", [False, True])
def test_core_attention_paths_match_naive_gqa(backend, explicit_mask):
    (out, ref), = run_distributed(_attention, 1, backend, explicit_mask, timeout=60)
    assert_rel_close(out, ref, what=f"{backend} attention")


def test_multi_query_attention_one_key_value_head_is_accepted_and_matches_naive():
    """num_query_groups=1 (multi-query attention, Shazeer 2019; Megatron-LM's --num-query-groups 1): one key/value
    head for every query head. The group check refused it under a mutant (``groups < 1`` -> ``< 2``)."""
    (out, ref), = run_distributed(_attention, 1, "auto", True, 1, timeout=60)
    assert_rel_close(out, ref, what="multi-query attention")


def _blocked_causal_attention(seq, block, dropout_p, dtype=torch.float64):
    """The explicit causal path by query blocks: output and q/k/v gradients against the naive loop
    (float64; bf16 inputs against the loop on their float64 values), and with dropout a float64
    gradcheck whose every call replays the same masks."""
    import megatron_core.transformer.dot_product_attention as dpa  # noqa: PLC0415
    dpa.CAUSAL_BLOCK = block  # a forked rank of its own: the change ends with it
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    config = TransformerConfig(hidden_size=16, num_attention_heads=4, num_query_groups=2,
                               attention_backend="unfused", attention_dropout=dropout_p)
    attn = DotProductAttention(config, layer_number=1, parallel_state=ps).to(dtype)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(seq, 2, 4, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k, v = (torch.randn(seq, 2, 2, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    if dropout_p == 0:
        out = attn.eval()(q, k, v)
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1).expand(2, 1, seq, seq)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = _naive_attention(q64, k64, v64, causal)
        weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((out * weights.to(dtype)).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * weights).sum(), (q64, k64, v64))
        return [(out.double(), ref)] + [(a.double(), e) for a, e in zip(grads, ref_grads, strict=True)]

    def replayed(q, k, v):
        ps.manual_seed(7)  # the tracker's stream from the same state: the same masks every call
        return attn.train()(q, k, v)
    assert not torch.equal(replayed(q, k, v), attn.eval()(q, k, v)), "dropout must act"
    return torch.autograd.gradcheck(replayed, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("seq,block", [(10, 4), (8, 4), (300, 128)])
def test_causal_attention_by_query_blocks_matches_naive(seq, block):
    (pairs,) = run_distributed(_blocked_causal_attention, 1, seq, block, 0.0, timeout=60)
    for i, (actual, expected) in enumerate(pairs):
        assert (actual - expected).abs().max().item() < 1e-12, f"{'output' if i == 0 else 'grad'} {i}"


def test_causal_attention_by_query_blocks_in_bf16():
    """bf16 operands, fp32 softmax: within four bf16 roundings (2**-8 each) of the largest entry, the
    gradients passing three bf16-rounded products (measured 4.8e-3 at most); a wrong mask, scale or
    block boundary is off by O(1)."""
    (pairs,) = run_distributed(_blocked_causal_attention, 1, 10, 4, 0.0, torch.bfloat16, timeout=60)
    for i, (actual, expected) in enumerate(pairs):
        err = (actual - expected).abs().max().item() / expected.abs().max().item()
        assert err < 4 * 2 ** -8, f"{'output' if i == 0 else 'grad'} {i}: {err:.2e}"


def test_causal_attention_by_query_blocks_dropout_gradients():
    (ok,) = run_distributed(_blocked_causal_attention, 1, 10, 4, 0.3, timeout=120)
    assert ok


def _blocked_dropout_in_low_precision(dtype):
    """The explicit causal path in ``dtype`` with dropout 0.1, sequence 140 (two query blocks of 128
    and 12), GQA, fp32 softmax: relative errors of the output and the q/k/v gradients against float64
    attention that applies the same keep masks (recorded as the module draws them)."""
    import megatron_core.transformer.dot_product_attention as dpa  # noqa: PLC0415
    drawn, draw = [], dpa.keep_mask
    dpa.keep_mask = lambda *args: drawn.append(draw(*args)) or drawn[-1]  # a forked rank of its own
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    ps.manual_seed(7)
    config = TransformerConfig(hidden_size=16, num_attention_heads=4, num_query_groups=2,
                               attention_backend="unfused", attention_dropout=0.1)
    attn = DotProductAttention(config, layer_number=1, parallel_state=ps).to(dtype).train()
    s, b, heads = 140, 2, 4
    g = torch.Generator().manual_seed(2)
    q64 = torch.randn(s, b, heads, 4, generator=g, dtype=torch.float64)
    k64, v64 = (torch.randn(s, b, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = attn(q, k, v)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights.to(dtype)).sum(), (q, k, v))
    keep = torch.zeros(b * heads, s, s)
    for (start, end), (block_keep, keep_scale) in zip(dpa.causal_blocks(s), drawn, strict=True):
        keep[:, start:end, :end] = block_keep * keep_scale
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    q3, k3, v3 = (t.permute(1, 2, 0, 3).repeat_interleave(heads // t.shape[2], 1).reshape(b * heads, s, 4)
                  for t in exact)
    scores = (q3 @ k3.transpose(1, 2) * attn.scale).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)
    ref = ((scores.softmax(-1) * keep.double()) @ v3).view(b, heads, s, 4).permute(2, 0, 1, 3).reshape(out.shape)
    ref_grads = torch.autograd.grad((ref * weights).sum(), exact)
    return [((a.double() - e).abs().max() / e.abs().max()).item()
            for a, e in zip((out, *grads), (ref, *ref_grads), strict=True)]


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 4 * 2 ** -8), (torch.float16, 8 * 2 ** -11)])
def test_causal_attention_by_query_blocks_dropout_in_low_precision(dtype, bound):
    """The blocked path's dropout backward (G D - P rowsum(G D), D the dropped probabilities kept in
    bf16/fp16, so the identity P c m = D holds only to their rounding) against float64 with the same
    masks, in units of the dtype's rounding (2**-8 bf16, 2**-11 fp16) of the largest entry: measured
    9.0e-3 bf16, 1.9e-3 fp16 at most (the seed here; autograd over the same bf16/fp16 operations, the
    mask kept, reached 1.4e-2 / 1.3e-3 over 8 seeds, the identity's median error ratio to it 0.9-1.1).
    A lost keep scale (1/0.9) or mask is off by 0.1 to O(1)."""
    (errors,) = run_distributed(_blocked_dropout_in_low_precision, 1, dtype, timeout=60)
    for name, err in zip(("output", "dq", "dk", "dv"), errors, strict=True):
        assert err < bound, f"{dtype} {name}: {err:.2e} of the largest entry"

def _blocked_dropout_streams():
    """A training forward at sequence 140 (two query blocks) with attention dropout, on each TP rank
    with the same q, k, v: the default generator's state before/after, the output, and the output
    again from the tracker's state before the first forward."""
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    ps.manual_seed(9)
    config = TransformerConfig(hidden_size=16, num_attention_heads=4, attention_backend="unfused",
                               attention_dropout=0.3)
    attn = DotProductAttention(config, layer_number=1, parallel_state=ps).train()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(140, 2, 4, 4, generator=g) for _ in range(3))
    tracker_before, default_before = ps.rng_tracker.get_states(), torch.get_rng_state()
    out = attn(q, k, v)
    default_after = torch.get_rng_state()
    ps.rng_tracker.set_states(tracker_before)
    return torch.equal(default_before, default_after), out, attn(q, k, v), attn.eval()(q, k, v)


def test_blocked_attention_dropout_draws_from_the_tp_rank_stream():
    """The causal blocks' dropout masks come from the tracker's per-TP-rank stream (Megatron-LM: attention
    dropout acts on activations split over TP), never the default generator, which the ranks share."""
    results = run_distributed(_blocked_dropout_streams, 2, timeout=60)
    for rank, (default_unchanged, out, replayed, no_dropout) in enumerate(results):
        assert default_unchanged, f"rank {rank}: attention dropout advanced the default generator"
        assert torch.equal(out, replayed), f"rank {rank}: the tracker's state must replay the same masks"
        assert not torch.equal(out, no_dropout), "dropout must act"
    assert not torch.equal(results[0][1], results[1][1]), "TP ranks drew the same attention dropout masks"


def test_scaled_masked_softmax_and_norms():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=g).to(torch.bfloat16)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0, :] = True  # a fully masked row must give a uniform row, not NaN
    probs = scaled_masked_softmax(x, mask, 0.5, softmax_in_fp32=True)
    assert probs.dtype == torch.bfloat16
    assert torch.equal(probs[..., 0, :].float(), torch.full((2, 3, 4), 0.25))
    assert_rel_close(probs[..., 1:, :].float(), torch.softmax(x[..., 1:, :].float() * 0.5, -1), tol=1e-2)

    h = torch.randn(5, 16, generator=g)
    rms = RMSNorm(16, eps=1e-6, sequence_parallel=True)
    ln = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5, generator=g)
    assert rms.weight.sequence_parallel and not ln.weight.sequence_parallel
    assert_rel_close(rms(h), h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight, what="RMSNorm")
    centred = h - h.mean(-1, keepdim=True)
    assert_rel_close(ln(h), centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5), what="LayerNorm")


class _DoubleMLP(MLP):
    """A new architecture by subclassing one part: the MLP output is doubled."""

    def forward(self, hidden_states):
        out, bias = super().forward(hidden_states)
        return 2 * out, None if bias is None else 2 * bias


def _custom_spec():
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    config = llama_config(2, 32, 4, num_query_groups=2, ffn_hidden_size=64)
    spec = get_gpt_layer_local_spec()
    spec.submodules.mlp = ModuleSpec(module=_DoubleMLP, submodules=spec.submodules.mlp.submodules)
    custom = GPTModel(config, 64, 16, parallel_state=ps, transformer_layer_spec=spec, make_vocab_size_divisible_by=8)
    plain = GPTModel(config, 64, 16, parallel_state=ps, make_vocab_size_divisible_by=8)
    ids = torch.arange(32).view(2, 16) % 64
    assert all(type(layer.mlp) is _DoubleMLP for layer in custom.decoder.layers)
    # Same seeded weights (the spec changes behaviour, not parameters).
    custom_state, plain_state = custom.state_dict(), plain.state_dict()
    assert list(custom_state) == list(plain_state)
    assert all(torch.equal(a, b) for a, b in zip(custom_state.values(), plain_state.values(), strict=True))
    plain_out = plain(ids)
    # Expected: the plain model with every MLP output (and bias) doubled, by a forward hook.
    for layer in plain.decoder.layers:
        layer.mlp.register_forward_hook(lambda _m, _i, out: (2 * out[0], None if out[1] is None else 2 * out[1]))
    return custom(ids), plain(ids), plain_out


def test_spec_swaps_a_submodule():
    (custom, doubled, plain), = run_distributed(_custom_spec, 1, timeout=60)
    assert torch.equal(custom, doubled), "the swapped MLP must double the MLP output, nothing else"
    assert (custom - plain).abs().max().item() > 1e-3, "the swap must change the output"


def test_cpu_dropout_is_unbiased_and_replayable():
    x = torch.ones(1 << 20, requires_grad=True)
    torch.manual_seed(0)
    out = dropout(x, 0.1)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - 0.1) < 2e-3, f"drop rate {dropped}"
    scale = out.max().item()
    assert torch.all((out == 0) | (out == scale)) and abs(scale * (1 - round(0.1 * 2 ** 16) / 2 ** 16) - 1) < 1e-6
    assert abs(out.mean().item() - 1.0) < 3e-3
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    assert torch.equal(x.grad, g * (out.detach() != 0) * scale)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1), out), "the same RNG state must give the same mask"
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    with pytest.raises(ValueError, match=r"rounds to 1 at the mask's resolution"):
        dropout(x, 1 - 2 ** -18)


def test_cpu_dropout_add_is_residual_plus_dropout():
    g = torch.Generator().manual_seed(4)
    x, residual = (torch.randn(64, 4, 32, generator=g, requires_grad=True) for _ in range(2))
    torch.manual_seed(5)
    out = dropout_add(x, residual, 0.2)
    torch.manual_seed(5)
    ref_x, ref_residual = x.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
    ref = ref_residual + dropout(ref_x, 0.2)
    assert_rel_close(out, ref, what="dropout_add")  # one rounding (addcmul) instead of two
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.equal(x.grad, ref_x.grad) and torch.equal(residual.grad, ref_residual.grad)
    assert torch.equal(dropout_add(x, residual, 0.0), residual + x)


def _layer_forwards_in_a_training_step(method, k, layers):
    """How many times each layer runs forward in one forward + backward with full recompute."""
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    config = llama_config(layers, 32, 4, num_query_groups=2, ffn_hidden_size=64, recompute_granularity="full",
                          recompute_method=method, recompute_num_layers=k)
    config.validate_parallel(ps.tp_size)  # as pretrain_gpt checks the layout
    model = GPTModel(config, 64, 8, parallel_state=ps, make_vocab_size_divisible_by=8)
    calls = [0] * layers
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(lambda _m, _i, _o, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.arange(16).view(2, 8)
    model(ids, labels=ids).mean().backward()
    return calls


@pytest.mark.parametrize("method,k,expected", [("uniform", 2, [2, 2, 2]), ("block", 2, [2, 2, 1]),
                                               ("block", 1, [2, 1, 1]), ("uniform", 1, [2]),
                                               ("block", 5, [2, 2, 2]), ("uniform", 5, [2, 2, 2])])
def test_full_recompute_reruns_the_layers_its_method_names(method, k, expected):
    """Megatron-LM's --recompute-method: ``uniform`` checkpoints every group of k layers (all of
    them run forward twice), ``block`` only the first k layers of the chunk; a one-layer chunk too.
    k above the chunk's layers recomputes them all, as Megatron-LM's (which checks only k >= 1);
    both were refused here ("exceeds the layers of a pipeline chunk", "in [1, num_layers]")."""
    (calls,) = run_distributed(_layer_forwards_in_a_training_step, 1, method, k, len(expected), timeout=60)
    assert calls == expected


def test_dropout_masks_honour_p_at_their_resolution():
    """p outside (0, 1) is refused; p = 2**-16 drops exactly one int16 value in 2**16 on the CPU (64 of
    2**22 draws expected: a comparison one value off would drop twice as many); other devices keep
    with torch's Bernoulli at 1 - p and scale by 1 / (1 - p) (the 'meta' device standing in)."""
    from megatron_core.fusions.fused_dropout import keep_mask

    cpu = torch.device("cpu")
    for p in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            keep_mask((4,), p, cpu)
    torch.manual_seed(0)
    keep, scale = keep_mask((1 << 22,), 2.0 ** -16, cpu)
    assert 32 <= int((~keep).sum()) <= 96 and scale == 2 ** 16 / (2 ** 16 - 1)
    keep, scale = keep_mask((4,), 0.25, torch.device("meta"))
    assert keep.dtype == torch.bool and scale == 1 / 0.75


def test_cpu_dropout_masks_of_successive_calls_differ():
    """Each mask comes from its own 64-bit seed drawn from torch's generator: successive calls draw
    different masks (a seed cut to a few bits would repeat them)."""
    from megatron_core.fusions.fused_dropout import keep_mask

    torch.manual_seed(0)
    masks = {keep_mask((64,), 0.5, torch.device("cpu"))[0].numpy().tobytes() for _ in range(16)}
    assert len(masks) == 16


def _qk_layernorm_grads():
    from megatron_core.distributed import finalize_model_grads

    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    config = llama_config(1, 32, 4, num_query_groups=2, ffn_hidden_size=64)
    spec = get_gpt_layer_local_spec(qk_layernorm=True)
    model = GPTModel(config, 64, 8, parallel_state=ps, transformer_layer_spec=spec, make_vocab_size_divisible_by=8)
    ids = (torch.arange(18).view(2, 9) * 7) % 64
    model(ids[:, :-1], labels=ids[:, 1:]).mean().backward()
    finalize_model_grads([model], ps)
    return {n: p.grad for n, p in model.named_parameters() if "q_layernorm" in n or "k_layernorm" in n}


def test_qk_layernorm_grads_under_tp2_match_tp1():
    """QK-norm weights are replicated over TP but each rank normalises only its own heads: their
    gradients are partial and summed over TP, so every TP-2 rank holds the TP-1 gradient."""
    (ref,) = run_distributed(_qk_layernorm_grads, 1, timeout=60)
    assert len(ref) == 2
    for rank, grads in enumerate(run_distributed(_qk_layernorm_grads, 2, timeout=60)):
        for name, grad in grads.items():
            assert_rel_close(grad, ref[name], what=f"rank {rank} grad of {name}")


def _auto_backend_with_dropout():
    """A training forward with attention dropout through ``auto`` and through ``unfused``, each from
    the same tracker state."""
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    ps.manual_seed(9)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(8, 2, 4, 4, generator=g) for _ in range(3))
    state, outs = ps.rng_tracker.get_states(), {}
    for backend in ("auto", "unfused"):
        config = TransformerConfig(hidden_size=16, num_attention_heads=4, attention_backend=backend,
                                   attention_dropout=0.3)
        ps.rng_tracker.set_states(state)
        outs[backend] = DotProductAttention(config, layer_number=1, parallel_state=ps).train()(q, k, v)
    return outs


def test_auto_backend_trains_with_dropout_on_the_explicit_path_on_cpu():
    """SDPA's CPU kernels have no dropout, so ``auto`` takes the explicit path there: the same output
    as ``unfused`` from the same RNG state."""
    (outs,) = run_distributed(_auto_backend_with_dropout, 1, timeout=60)
    assert torch.equal(outs["auto"], outs["unfused"])


def test_layer_norm_without_bias():
    """LayerNorm(bias=False): no bias parameter (``bias`` is None, as torch.nn.LayerNorm's), the
    normalised input times the weight."""
    ln = LayerNorm(16, eps=1e-5, bias=False)
    assert ln.bias is None and [name for name, _ in ln.named_parameters()] == ["weight"]
    h = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(4))
    centred = h - h.mean(-1, keepdim=True)
    assert_rel_close(ln(h), centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * ln.weight,
                     what="LayerNorm without bias")


def _auto_backend_without_dropout():
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    config = TransformerConfig(hidden_size=16, num_attention_heads=4, attention_backend="auto",
                               attention_dropout=0.0)
    attn = DotProductAttention(config, layer_number=1, parallel_state=ps)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(8, 2, 4, 4, generator=g) for _ in range(3))
    return attn.train()(q, k, v), attn.eval()(q, k, v)


def test_auto_backend_without_dropout_trains_as_it_evaluates():
    """With attention dropout 0 the ``auto`` backend keeps PyTorch's SDPA in training too: the training
    forward is the evaluation forward, bit for bit."""
    ((train, evaluate),) = run_distributed(_auto_backend_without_dropout, 1, timeout=60)
    assert torch.equal(train, evaluate)
