"""Column/row-parallel linear and vocab-parallel embedding against plain torch, TP 1/2/4, +/- SP."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from equivalence import assert_rel_close
from harness import RankError, run_distributed

from megatron_core import parallel_state
from megatron_core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_method_normal,
    pad_vocab_size,
)

SEQ, BATCH, IN, OUT = 8, 3, 12, 16
LAYOUTS = [(tp, sp) for tp in (1, 2, 4) for sp in (False, True)]


def _inputs(shape_in, shape_out):
    g = torch.Generator().manual_seed(7)
    return torch.randn(*shape_in, generator=g), torch.randn(*shape_out, generator=g)


def _column(sp, gather_output):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    tp, r = ps.tp_size, ps.tp_rank
    torch.manual_seed(1234)
    layer = ColumnParallelLinear(IN, OUT, gather_output=gather_output, sequence_parallel=sp,
                                 init_method=init_method_normal(0.5))
    with torch.no_grad():
        layer.bias.copy_(torch.arange(OUT, dtype=torch.float32).chunk(tp)[r])
    x_full, g_full = _inputs((SEQ, BATCH, IN), (SEQ, BATCH, OUT))
    x = (x_full.chunk(tp)[r] if sp else x_full).clone().requires_grad_()
    out, bias = layer(x)
    assert bias is None
    g = g_full if gather_output else g_full.chunk(tp, dim=-1)[r]
    (out * g).sum().backward()
    return out.detach(), layer.weight.detach(), layer.weight.grad, layer.bias.grad, x.grad


@pytest.mark.parametrize("tp,sp", LAYOUTS)
def test_column_parallel_linear(tp, sp):
    torch.manual_seed(1234)
    w = torch.empty(OUT, IN)
    init_method_normal(0.5)(w)
    b = torch.arange(OUT, dtype=torch.float32).requires_grad_()
    w.requires_grad_()
    x_full, g_full = _inputs((SEQ, BATCH, IN), (SEQ, BATCH, OUT))
    x_ref = x_full.clone().requires_grad_()
    ref = F.linear(x_ref, w, b)
    (ref * g_full).sum().backward()
    for gather in ([False] if sp else [False, True]):
        results = run_distributed(_column, tp, sp, gather, timeout=60)
        for r, (out, weight, wgrad, bgrad, xgrad) in enumerate(results):
            assert torch.equal(weight, w.detach().chunk(tp)[r]), "TP shard differs from the serial init"
            assert_rel_close(out, ref.detach() if gather else ref.detach().chunk(tp, -1)[r], what="output")
            assert_rel_close(wgrad, w.grad.chunk(tp)[r], what="weight grad")
            assert_rel_close(bgrad, b.grad.chunk(tp)[r], what="bias grad")
            assert_rel_close(xgrad, x_ref.grad.chunk(tp)[r] if sp else x_ref.grad, what="input grad")


def _saved_shapes_sp_column():
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    layer = ColumnParallelLinear(IN, OUT, sequence_parallel=True)
    x = torch.randn(SEQ // ps.tp_size, BATCH, IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out, _ = layer(x)
    out.sum().backward()
    return saved, x.grad.shape


def test_sequence_parallel_column_keeps_only_the_local_input_shard():
    """Megatron-LM keeps x [s/TP, b, h] for backward and all-gathers it again there (Korthikanti et al. 4.2.2)."""
    for saved, grad_shape in run_distributed(_saved_shapes_sp_column, 2, timeout=60):
        assert (SEQ // 2, BATCH, IN) in saved and (SEQ, BATCH, IN) not in saved, saved
        assert grad_shape == (SEQ // 2, BATCH, IN)


def _row(sp):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    tp, r = ps.tp_size, ps.tp_rank
    torch.manual_seed(99)
    layer = RowParallelLinear(OUT, IN, input_is_parallel=True, sequence_parallel=sp,
                              init_method=init_method_normal(0.5))
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, IN))
    x_full, g_full = _inputs((SEQ, BATCH, OUT), (SEQ, BATCH, IN))
    x = x_full.chunk(tp, dim=-1)[r].clone().requires_grad_()
    out, _ = layer(x)
    (out * (g_full.chunk(tp)[r] if sp else g_full)).sum().backward()
    bgrad = layer.bias.grad.clone()
    if sp:  # partial per sequence shard; the DDP wrapper sums sequence-parallel grads over TP
        dist.all_reduce(bgrad, group=ps.tp_group)
    return out.detach(), layer.weight.grad, bgrad, x.grad


@pytest.mark.parametrize("tp,sp", LAYOUTS)
def test_row_parallel_linear(tp, sp):
    torch.manual_seed(99)
    w = torch.empty(IN, OUT)
    init_method_normal(0.5)(w)
    w.requires_grad_()
    b = torch.linspace(-1, 1, IN).requires_grad_()
    x_full, g_full = _inputs((SEQ, BATCH, OUT), (SEQ, BATCH, IN))
    x_ref = x_full.clone().requires_grad_()
    ref = F.linear(x_ref, w, b)
    (ref * g_full).sum().backward()
    for r, (out, wgrad, bgrad, xgrad) in enumerate(run_distributed(_row, tp, sp, timeout=60)):
        assert_rel_close(out, ref.detach().chunk(tp)[r] if sp else ref.detach(), what="output")
        assert_rel_close(wgrad, w.grad.chunk(tp, dim=1)[r], what="weight grad")
        assert_rel_close(bgrad, b.grad, what="bias grad")
        assert_rel_close(xgrad, x_ref.grad.chunk(tp, dim=-1)[r], what="input grad")


VOCAB, HIDDEN = 32, 8


def _ids():
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def _embedding(sp):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    tp, r = ps.tp_size, ps.tp_rank
    torch.manual_seed(5)
    emb = VocabParallelEmbedding(VOCAB, HIDDEN, init_method=init_method_normal(1.0), reduce_scatter_embeddings=sp)
    out = emb(_ids())
    g = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(4))
    (out * (g.chunk(tp)[r] if sp else g.transpose(0, 1))).sum().backward()
    return out.detach(), emb.weight.grad


@pytest.mark.parametrize("tp,sp", LAYOUTS)
def test_vocab_parallel_embedding(tp, sp):
    torch.manual_seed(5)
    w = torch.empty(VOCAB, HIDDEN)
    init_method_normal(1.0)(w)
    w.requires_grad_()
    ref = F.embedding(_ids(), w)
    g = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(4))
    (ref * g.transpose(0, 1)).sum().backward()
    for r, (out, wgrad) in enumerate(run_distributed(_embedding, tp, sp, timeout=60)):
        expected = ref.detach().transpose(0, 1).chunk(tp)[r] if sp else ref.detach()
        assert_rel_close(out, expected, what="embedding output")
        assert_rel_close(wgrad, w.grad.chunk(tp)[r], what="embedding grad")


def _bad_ids(ids):
    parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    emb = VocabParallelEmbedding(VOCAB, HIDDEN)
    emb(torch.tensor([ids]))


@pytest.mark.parametrize("ids,bad", [([1, VOCAB + 3], VOCAB + 3), ([0, VOCAB + 3], VOCAB + 3), ([-2, 5], -2)])
def test_ids_outside_vocabulary_are_rejected(ids, bad):
    """The error names the offending id: the largest when it is too large (also beside an id 0), else the
    negative one."""
    with pytest.raises(RankError, match=rf"token id {bad} is outside the vocabulary \[0, 32\)"):
        run_distributed(_bad_ids, 2, ids, timeout=60)


def _column_frozen_weight(sp):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    tp, r = ps.tp_size, ps.tp_rank
    torch.manual_seed(1234)
    layer = ColumnParallelLinear(IN, OUT, sequence_parallel=sp, init_method=init_method_normal(0.5))
    layer.weight.requires_grad_(False)
    x_full, g_full = _inputs((SEQ, BATCH, IN), (SEQ, BATCH, OUT))
    x = (x_full.chunk(tp)[r] if sp else x_full).clone().requires_grad_()
    out, _ = layer(x)
    (out * g_full.chunk(tp, dim=-1)[r]).sum().backward()
    return layer.weight.grad, layer.bias.grad, x.grad


@pytest.mark.parametrize("sp", [False, True])
def test_frozen_column_weight_still_passes_the_input_gradient(sp):
    """A frozen ColumnParallelLinear weight (fine-tuning the layers above) gets no gradient, but the
    input's gradient is still computed and summed over TP (reduce-scattered with SP), as in one process."""
    torch.manual_seed(1234)
    w = torch.empty(OUT, IN)
    init_method_normal(0.5)(w)
    x_full, g_full = _inputs((SEQ, BATCH, IN), (SEQ, BATCH, OUT))
    x_ref = x_full.clone().requires_grad_()
    (F.linear(x_ref, w) * g_full).sum().backward()
    (ref,) = run_distributed(_column_frozen_weight, 1, False, timeout=60)
    assert ref[0] is None
    for r, (wgrad, bgrad, xgrad) in enumerate(run_distributed(_column_frozen_weight, 2, sp, timeout=60)):
        assert wgrad is None
        assert_rel_close(bgrad, g_full.sum(dim=(0, 1)).chunk(2)[r], what="bias grad")
        assert_rel_close(xgrad, x_ref.grad.chunk(2)[r] if sp else x_ref.grad, what="input grad")


def _indivisible():
    parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    ColumnParallelLinear(IN, 10)


def test_sizes_not_divisible_by_tp_are_rejected():
    message = "ColumnParallelLinear output_size 10 is not divisible by the tensor-parallel size 4"
    with pytest.raises(RankError, match=message):
        run_distributed(_indivisible, 4, timeout=60)


def test_vocabulary_padding_is_a_multiple_of_divisible_by_times_tp():
    """Megatron-LM's _vocab_size_with_padding: the padded vocabulary is a multiple of make_vocab_size_divisible_by
    x TP, so every TP shard of the embedding holds a multiple of make_vocab_size_divisible_by rows (GPT-2's 50257
    ids: 50304 at TP 1, 50432 at TP 2, 50688 at TP 4, 51200 at TP 8)."""
    assert [pad_vocab_size(50257, 128, tp) for tp in (1, 2, 4, 8)] == [50304, 50432, 50688, 51200]
    assert pad_vocab_size(256, 128, 2) == 256
    assert pad_vocab_size(512, 128, 2) == 512


def _column_autocast(sp):
    """ColumnParallelLinear then RowParallelLinear under CPU autocast (bf16): outputs and fp32 grads."""
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    tp, r = ps.tp_size, ps.tp_rank
    torch.manual_seed(1234)
    col = ColumnParallelLinear(IN, OUT, sequence_parallel=sp, init_method=init_method_normal(0.5))
    row = RowParallelLinear(OUT, IN, input_is_parallel=True, sequence_parallel=sp,
                            init_method=init_method_normal(0.5))
    x_full, _ = _inputs((SEQ, BATCH, IN), (SEQ, BATCH, OUT))
    x = (x_full.chunk(tp)[r] if sp else x_full).clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = row(col(x)[0])
    out.float().sum().backward()
    return out.detach().float(), x.grad, col.weight.grad, row.weight.grad


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_linears_under_cpu_autocast(sp):
    """The TP backward runs in the forward's autocast state (Megatron-LM's custom_bwd): TP 2 gives
    TP 1's bf16 outputs and gradients within 2e-2 relative (bf16 keeps 8 bits: its epsilon is
    3.9e-3, and TP 2 rounds two partial sums before adding them), and the gradients are fp32."""
    (ref_out, ref_x, ref_col, ref_row), = run_distributed(_column_autocast, 1, False, timeout=60)
    for r, (out, xgrad, colgrad, rowgrad) in enumerate(run_distributed(_column_autocast, 2, sp, timeout=60)):
        assert xgrad.dtype == colgrad.dtype == rowgrad.dtype == torch.float32
        assert_rel_close(out, ref_out.chunk(2)[r] if sp else ref_out, tol=2e-2, what="output")
        assert_rel_close(xgrad, ref_x.chunk(2)[r] if sp else ref_x, tol=2e-2, what="input grad")
        assert_rel_close(colgrad, ref_col.chunk(2)[r], tol=2e-2, what="column weight grad")
        assert_rel_close(rowgrad, ref_row.chunk(2, dim=1)[r], tol=2e-2, what="row weight grad")
