"""The Triton kernels of ``megatron_core.fusions`` against the torch versions, forward and backward.

Run on CPU in Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported): tiny
shapes and fixed block sizes (autotune does not run there), with sizes that are not powers of two
and several programs per tensor so masking and the cross-program reductions are exercised.
Skipped when triton is not installed (it is in the ``test`` and ``gpu`` extras).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from equivalence import assert_rel_close  # noqa: E402
from harness import run_distributed  # noqa: E402

from megatron_core import device, parallel_state, tensor_parallel  # noqa: E402
from megatron_core.fusions import Kernel, LayerNorm, RMSNorm, find_kernel  # noqa: E402
from megatron_core.fusions import triton_cross_entropy as tce  # noqa: E402
from megatron_core.fusions import triton_elementwise as tel  # noqa: E402
from megatron_core.fusions import triton_norms as tno  # noqa: E402
from megatron_core.fusions.fused_softmax import causal_mask  # noqa: E402
from megatron_core.fusions.fused_softmax import scaled_masked_softmax as torch_softmax  # noqa: E402
from megatron_core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy as torch_ce  # noqa: E402
from megatron_core.transformer.mlp import ACTIVATIONS  # noqa: E402
from megatron_core.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb  # noqa: E402


def _interpreter_runs_loops() -> bool:
    """Whether this Triton's interpreter runs a loop bounded by a runtime argument. Triton 3.6's
    does ``int()`` of a one-element array there, which NumPy 2.4 refuses (Triton 3.9 squeezes it
    first): then the kernels with such loops cannot run here, although they compile
    (tests/test_triton_compile.py) and run on a GPU."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(OUT, N):
        acc = 0
        for _ in range(0, N):
            acc += 1
        tl.store(OUT, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception:  # noqa: BLE001 (the interpreter's error is the answer)
        return False
    return int(out) == 3


runtime_loops = pytest.mark.skipif(not _interpreter_runs_loops(), reason=(
    "this Triton's interpreter cannot run loops bounded by a runtime argument with this NumPy "
    "(seen with Triton 3.6 and NumPy 2.4; Triton 3.9 runs them); the kernels still compile "
    "(test_triton_compile.py)"))


def _grads(fn, *tensors, seed=11):
    """fn(*tensors), and the grads of sum(out * g) for a fixed random g, as plain tensors."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def _compare(fused, reference, *tensors, what):
    out, grads = _grads(fused, *tensors)
    ref_out, ref_grads = _grads(reference, *tensors)
    assert_rel_close(out, ref_out, what=f"{what} forward")
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_rel_close(g, r, what=f"{what} grad {i}")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@runtime_loops
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(bias):
    x, w, b = _randn(5, 3, 20), _randn(20, seed=1), _randn(20, seed=2)
    if bias:
        _compare(lambda x, w, b: tno.layer_norm(x, w, b, 1e-5, bwd_programs=4),
                 lambda x, w, b: F.layer_norm(x, (20,), w, b, 1e-5), x, w, b, what="LayerNorm")
    else:
        _compare(lambda x, w: tno.layer_norm(x, w, None, 1e-5, bwd_programs=4),
                 lambda x, w: F.layer_norm(x, (20,), w, None, 1e-5), x, w, what="LayerNorm without bias")


@runtime_loops
def test_rms_norm():
    x, w = _randn(7, 2, 12), _randn(12, seed=1)
    _compare(lambda x, w: tno.rms_norm(x, w, 1e-5, bwd_programs=3),
             lambda x, w: F.rms_norm(x, (12,), w, 1e-5), x, w, what="RMSNorm")


@pytest.mark.parametrize("bwd_programs", [0, -2])
def test_norm_bwd_programs_must_be_positive(bwd_programs):
    """0 is not "the default" (None is) and a negative count is not one program: both are refused."""
    x, w = _randn(4, 8), _randn(8, seed=1)
    with pytest.raises(ValueError, match="bwd_programs must be None"):
        tno.layer_norm(x, w, None, 1e-5, bwd_programs=bwd_programs)
    with pytest.raises(ValueError, match="bwd_programs must be None"):
        tno.rms_norm(x, w, 1e-5, bwd_programs=bwd_programs)


@runtime_loops
def test_norm_modules_use_a_plugged_kernel():
    """The modules' kernel slot routes to the Triton function (how kernels.py selects it on CUDA)."""
    x = _randn(4, 2, 16)
    ln_kernel = Kernel(tno.layer_norm, lambda *a: True, "triton layer_norm")
    rms_kernel = Kernel(tno.rms_norm, lambda *a: True, "triton rms_norm")
    for fused, plain in [(LayerNorm(16, kernel=ln_kernel), LayerNorm(16, kernel=None)),
                         (RMSNorm(16, kernel=rms_kernel), RMSNorm(16, kernel=None))]:
        with torch.no_grad():
            for p in (*fused.parameters(), *plain.parameters()):
                p.copy_(_randn(16, seed=5))
        _compare(fused, plain, x, what=type(fused).__name__)


@runtime_loops
def test_zero_centered_norm_modules_hand_the_triton_kernel_one_plus_weight():
    """--apply-layernorm-1p: the Triton kernels get 1 + weight, forward and backward as the torch path."""
    x = _randn(4, 2, 16)
    ln_kernel = Kernel(tno.layer_norm, lambda *a: True, "triton layer_norm")
    rms_kernel = Kernel(tno.rms_norm, lambda *a: True, "triton rms_norm")
    for fused, plain in [(LayerNorm(16, kernel=ln_kernel, zero_centered_gamma=True),
                          LayerNorm(16, kernel=None, zero_centered_gamma=True)),
                         (RMSNorm(16, kernel=rms_kernel, zero_centered_gamma=True),
                          RMSNorm(16, kernel=None, zero_centered_gamma=True))]:
        with torch.no_grad():
            for p in (*fused.parameters(), *plain.parameters()):
                p.copy_(_randn(16, seed=5) * 0.1)
        _compare(fused, plain, x, what=f"zero-centred {type(fused).__name__}")
        g = _randn(4, 2, 16, seed=7)
        for module in (fused, plain):
            (module(x) * g).sum().backward()
        for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
            assert_rel_close(p.grad, q.grad, what=f"zero-centred {type(fused).__name__} grad of {name}")


@pytest.mark.parametrize("mask_kind", ["causal-index", "causal-mask", "padding", "fully-masked-row"])
def test_scaled_masked_softmax(mask_kind):
    b, h, sq, sk = 2, 3, 5, 7
    scores = _randn(b, h, sq, sk)
    mask = None
    if mask_kind == "causal-mask":
        mask = causal_mask(sq, sk, scores.device)
    elif mask_kind == "padding":  # [b, 1, 1, sk]: broadcast over heads and queries
        mask = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
        mask[0, ..., -2:] = True
    elif mask_kind == "fully-masked-row":
        mask = torch.zeros(1, 1, sq, sk, dtype=torch.bool)
        mask[..., 1, :] = True
    reference_mask = causal_mask(sq, sk, scores.device) if mask is None else mask
    _compare(lambda s: tno.scaled_masked_softmax(s, mask, 0.37), lambda s: torch_softmax(s, reference_mask, 0.37),
             scores, what=f"softmax ({mask_kind})")


@pytest.mark.parametrize("rotary_dim", [8, 6])
def test_rope(rotary_dim):
    s, b, heads, d = 5, 2, 3, 8
    cos, sin = RotaryEmbedding(rotary_dim)(torch.arange(s).expand(b, s) + torch.tensor([[0], [3]]))
    _compare(lambda x: tel.apply_rotary_pos_emb(x, cos, sin), lambda x: apply_rotary_pos_emb(x, (cos, sin)),
             _randn(s, b, heads, d), what=f"RoPE rotary_dim={rotary_dim}")


@pytest.mark.parametrize("heads, d, rotary_dim", [(1, 8, 8), (33, 9, 2), (5, 12, 6), (80, 130, 128)])
def test_rope_head_tile_edges(heads, d, rotary_dim):
    """The [heads, rotary_dim / 2] tile of one program: one head, a head count far from a power of
    two, the smallest rotary part with an odd pass-through rest, a rotary half that is not a
    power of two, and heads over several programs (80 x 64 > ROPE_TILE: tiles of 32, the last half
    full)."""
    s, b = 3, 2
    cos, sin = RotaryEmbedding(rotary_dim)(torch.arange(s).expand(b, s))
    _compare(lambda x: tel.apply_rotary_pos_emb(x, cos, sin), lambda x: apply_rotary_pos_emb(x, (cos, sin)),
             _randn(s, b, heads, d), what=f"RoPE heads={heads} d={d} rotary_dim={rotary_dim}")


def test_swiglu():
    _compare(lambda x: tel.swiglu(x, block=4), ACTIVATIONS["swiglu"], _randn(3, 2, 22), what="SwiGLU")


def _bda(seed):
    x, bias, residual = _randn(6, 2, 16, seed=1), _randn(16, seed=2), _randn(6, 2, 16, seed=3)
    torch.manual_seed(seed)
    out, (dx, dbias, dres) = _grads(lambda x, b, r: tel.bias_dropout_add(x, b, r, 0.25, block=64), x, bias, residual)
    return x, bias, residual, out, dx, dbias, dres


def test_bias_dropout_add():
    x, bias, residual, out, dx, dbias, dres = _bda(seed=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    kept = out != residual
    dropped = 1 - kept.float().mean().item()
    assert 0.1 < dropped < 0.4, f"dropped fraction {dropped} far from p = 0.25"
    assert_rel_close(out, residual + torch.where(kept, (x + bias) / 0.75, 0.0), what="bias-dropout-add forward")
    # Backward regenerates the forward's mask from the seed: it must zero exactly the dropped elements.
    assert_rel_close(dx, torch.where(kept, g / 0.75, 0.0), what="input grad")
    assert_rel_close(dbias, dx.sum((0, 1)), what="bias grad")
    assert torch.equal(dres, g)
    again = _bda(seed=0)[3]
    assert torch.equal(again, out), "the mask must follow the default generator's state"
    assert not torch.equal(_bda(seed=1)[3], out)


def test_bias_dropout_add_partial_block():
    """A size that is not a multiple of the block (the last program's four quarter-blocks are
    partly out of range): forward and backward drop the same elements."""
    x, bias, residual = _randn(5, 3, 7, seed=1), _randn(7, seed=2), _randn(5, 3, 7, seed=3)
    torch.manual_seed(0)
    out, (dx, _, _) = _grads(lambda x, b, r: tel.bias_dropout_add(x, b, r, 0.3, block=32), x, bias, residual)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    kept = dx != 0
    assert 0.1 < 1 - kept.float().mean().item() < 0.5
    scale = 2 ** 16 / (2 ** 16 - round(0.3 * 2 ** 16))  # the exact inverse keep rate, as the CPU mask's
    assert_rel_close(out, residual + torch.where(kept, (x + bias) * scale, 0.0), what="forward")
    assert_rel_close(dx, torch.where(kept, g * scale, 0.0), what="input grad")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_bias_dropout_add_keep_rate(p):
    """Each Philox word gives two 16-bit draws: over 2**16 elements (8,192 counters) the dropped
    fraction is p within 5 standard deviations, and so is it within each eighth of the blocks (the
    words' low and high halves of the four words: a half that never dropped, or always, fails)."""
    n, block = 1 << 16, 1024
    torch.manual_seed(5)
    out = tel.bias_dropout_add(torch.ones(n), None, torch.zeros(n), p, block=block)
    dropped = (out == 0).float()
    assert torch.all((out == 0) | (out == 2 ** 16 / (2 ** 16 - round(p * 2 ** 16))))
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.mean().item() - p) < 5 * sd, f"dropped {dropped.mean().item()} for p = {p}"
    by_eighth = dropped.view(-1, 8, block // 8)
    eighths = by_eighth.mean((0, 2))
    assert torch.all((eighths - p).abs() < 5 * sd * 8 ** 0.5), f"dropped per eighth of a block: {eighths}"
    # The eight elements one counter decides (two halves of each of four words) are independent:
    # every pair of eighths agrees as often as two independent draws do.
    i, j = torch.triu_indices(8, 8, offset=1)
    same = (by_eighth[:, i] == by_eighth[:, j]).float().mean((0, 2))
    agree, n_pairs = p * p + (1 - p) ** 2, n // 8
    assert torch.all((same - agree).abs() < 5 * (agree * (1 - agree) / n_pairs) ** 0.5), f"eighths agree: {same}"


def _bda_checkpoint_vs_plain():
    ps = parallel_state.initialize_model_parallel(1, 1)
    w, bias, x0 = _randn(8, 16, seed=1), _randn(16, seed=2), _randn(5, 16, seed=3)
    outs = []
    for use_checkpoint in (False, True):
        ps.manual_seed(123)
        a, b, x = w.clone().requires_grad_(), bias.clone().requires_grad_(), x0.clone().requires_grad_()

        def block(x, a=a, b=b):
            h = tel.bias_dropout_add(x[:, :8] @ a, b, x, 0.3, block=16)  # the default generator's seed
            with ps.rng_tracker.fork():  # the tracker's, as under sequence parallelism
                return tel.bias_dropout_add(torch.tanh(h)[:, :8] @ a, b, h, 0.3, block=16)
        y = tensor_parallel.checkpoint(block, ps.rng_tracker, x) if use_checkpoint else block(x)
        (y * y).sum().backward()
        outs.append((y.detach(), x.grad, a.grad, b.grad))
    return outs


def test_bias_dropout_add_recompute_draws_the_same_masks():
    """Activation recompute replays the RNG states, so the kernel's re-drawn seeds and four-per-call
    Philox masks, inside and outside the tracker's fork, give bitwise the same output and grads."""
    plain, recomputed = run_distributed(_bda_checkpoint_vs_plain, 1, timeout=60)[0]
    for name, p, r in zip(("output", "input grad", "weight grad", "bias grad"), plain, recomputed, strict=True):
        assert torch.equal(p, r), name


@runtime_loops
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy(label_smoothing):
    logits = _randn(3, 4, 37)
    target = torch.randint(0, 37, (3, 4), generator=torch.Generator().manual_seed(4))
    target[0, 1] = -100
    _compare(lambda x: tce.vocab_parallel_cross_entropy(x, target, None, label_smoothing, block=16),
             lambda x: torch_ce(x, target, None, label_smoothing), logits, what="cross entropy")


@runtime_loops
@pytest.mark.parametrize("block", [8, 64])
def test_cross_entropy_online_max(block):
    """Large logits whose running max grows block after block (each lane's sum is rescaled), and a
    block wider than the vocabulary (lanes that never see a logit must add 0, not nan)."""
    logits = _randn(4, 37) * 30 + torch.linspace(-200, 200, 37)
    target = torch.tensor([0, 36, 18, 5])
    _compare(lambda x: tce.vocab_parallel_cross_entropy(x, target, None, 0.1, block=block),
             lambda x: torch_ce(x, target, None, 0.1), logits, what=f"cross entropy, block {block}")


@runtime_loops
def test_cross_entropy_logits_far_from_zero():
    """Logits near 1000 and losses near 1: the loss is log(sum exp(x - max)) - (x_t - max), not
    (max + log(sum exp(x - max))) - x_t, which loses ulp(1000) = 6e-5 absolute."""
    logits = _randn(4, 3, 37) * 2 + 1000
    target = torch.randint(0, 37, (4, 3), generator=torch.Generator().manual_seed(4))
    _compare(lambda x: tce.vocab_parallel_cross_entropy(x, target, None, 0.0, block=16),
             lambda x: torch_ce(x, target, None, 0.0), logits, what="cross entropy near 1000")


def _smoothed_near_1000(block):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    logits = _randn(4, 3, 40) * 2 + 1000
    target = torch.randint(0, 40, (4, 3), generator=torch.Generator().manual_seed(4))
    shard = logits.chunk(ps.tp_size, dim=-1)[ps.tp_rank]
    out, (grad,) = _grads(lambda x: tce.vocab_parallel_cross_entropy(x, target, ps.tp_group, 0.1, block=block),
                          shard)
    ref, (ref_grad,) = _grads(lambda x: F.cross_entropy(x.double().view(-1, 40), target.view(-1), reduction="none",
                                                        label_smoothing=0.1).view(4, 3), logits)
    return out, grad, ref, ref_grad.chunk(ps.tp_size, dim=-1)[ps.tp_rank]


@runtime_loops
@pytest.mark.parametrize("tp, block", [(1, 8), (1, 64), (2, 8)])
def test_cross_entropy_label_smoothing_keeps_precision_near_1000(tp, block):
    """The smoothing term log(sum_exp) - mean(x - max): the kernel sums logits relative to its running
    max (several blocks, each earlier one moved as the max grows; or one block wider than the row), so
    at logits near 1000 the loss is within 1e-6 of float64 (a raw sum lost ulp(1000) = 6e-5 absolute,
    several 1e-6 relative on these losses)."""
    for out, grad, ref, ref_grad in run_distributed(_smoothed_near_1000, tp, block, timeout=120):
        assert_rel_close(out.double(), ref, tol=1e-6, what=f"TP {tp} block {block} smoothed loss")
        assert_rel_close(grad.double(), ref_grad, what=f"TP {tp} block {block} smoothed logits grad")


def _tp_cross_entropy(label_smoothing, rank0_shift, rank1_padding):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    logits = _randn(4, 3, 40)
    logits[..., :20] += rank0_shift  # rank 0's shard, so the two ranks' local maxima differ by that much
    target = torch.randint(0, 40, (4, 3), generator=torch.Generator().manual_seed(4))
    if rank0_shift:  # each target rank 0's largest logit: losses below 1 (one near the shift would set the floor)
        target = logits[..., :20].argmax(-1)
    if rank1_padding:  # rank 1's whole shard is masked vocabulary padding: its rows' max is fp32's lowest
        logits[..., 20:] = float("-inf")
        target %= 20
    shard = logits.chunk(ps.tp_size, dim=-1)[ps.tp_rank]
    out, (grad,) = _grads(lambda x: tce.vocab_parallel_cross_entropy(x, target, ps.tp_group, label_smoothing,
                                                                     block=8), shard)
    ref, (ref_grad,) = _grads(lambda x: F.cross_entropy(x.double().view(-1, 40), target.view(-1), reduction="none",
                                                        label_smoothing=label_smoothing).view(4, 3), logits)
    return out, grad, ref, ref_grad.chunk(ps.tp_size, dim=-1)[ps.tp_rank]


@runtime_loops
@pytest.mark.parametrize("label_smoothing, rank0_shift, rank1_padding",
                         [(0.1, 0.0, False), (0.0, 1000.0, False), (0.0, 0.0, True)])
def test_cross_entropy_vocab_parallel_tp2(label_smoothing, rank0_shift, rank1_padding):
    """With a shift of 1000, rank 1's sum of exp underflows to 0 once moved to the global max (rank
    0's), and every target is on rank 0 with a loss below 1 next to logits near 1000. With rank 1's
    shard all -inf, its sum must be 0, not exp(-inf - -inf) = nan."""
    for out, grad, ref, ref_grad in run_distributed(_tp_cross_entropy, 2, label_smoothing, rank0_shift,
                                                    rank1_padding, timeout=120):
        assert_rel_close(out, ref, what="TP-2 loss")
        assert_rel_close(grad, ref_grad, what="TP-2 logits grad")


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "scaled_masked_softmax", "rope", "swiglu",
                                "bias_dropout_add", "vocab_parallel_cross_entropy"])
def test_kernels_are_selected_only_with_cuda(op):
    """On this CPU machine no Triton kernel is picked even though triton imports (SwiGLU's kernel
    here is torch.compile's CPU one, tested in test_compiled_fusions.py)."""
    if device.cuda_available():
        pytest.skip("a CUDA device is present")
    kernel = find_kernel(op)
    assert kernel is None or (op == "swiglu" and kernel.name == "torch.compile swiglu (CPU)")


def test_kernel_selection_rules_on_a_cuda_machine(monkeypatch, caplog):
    """What ``find_kernel`` picks and accepts on a CUDA machine with Triton (and without apex). No GPU
    here: CUDA's presence is faked through ``device.cuda_available``/``triton_available`` (and
    ``kernels._on_cuda`` for the shape rules, on meta tensors), so only the selection logic runs."""
    import importlib.util
    import logging

    from megatron_core.fusions import kernels

    if importlib.util.find_spec("apex") is not None:
        pytest.skip("apex is installed: its kernels come first")
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(device, "triton_available", lambda: True)
    find_kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=kernels.__name__):
            found = {op: find_kernel(op) for op in kernels._PROVIDERS}
        gelu_tanh = found.pop("gelu_tanh")  # a CPU kernel (torch.compile), where a C++ compiler is found
        assert (gelu_tanh is not None) == device.cpu_compiler_available()  # Triton's SwiGLU comes first
        assert {op: k.name for op, k in found.items()} == {
            op: f"triton {module}.{op if op != 'rope' else 'apply_rotary_pos_emb'}" for op, module in (
                ("layer_norm", "triton_norms"), ("rms_norm", "triton_norms"), ("scaled_masked_softmax", "triton_norms"),
                ("rope", "triton_elementwise"), ("swiglu", "triton_elementwise"),
                ("bias_dropout_add", "triton_elementwise"), ("vocab_parallel_cross_entropy", "triton_cross_entropy"))}
        assert f"using fused kernel {found['swiglu'].name} for swiglu" in caplog.messages
        # CPU tensors (a CPU model on a CUDA machine) keep the torch path.
        x = torch.zeros(2, 1, 2, 8)
        cpu_operands = {"layer_norm": (x,), "rms_norm": (x,), "scaled_masked_softmax": (x, None, 1.0),
                        "rope": (x, x, x), "swiglu": (x,), "bias_dropout_add": (x, None, x),
                        "vocab_parallel_cross_entropy": (x, x)}
        assert not any(found[op].applies(*args) for op, args in cpu_operands.items())
        # Rows of up to _MAX_ROW = 16384 (one program holds a row), softmax on [b, np, sq, sk], RoPE on 4-D.
        monkeypatch.setattr(kernels, "_on_cuda", lambda *tensors: True)
        meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
        for op in ("layer_norm", "rms_norm"):
            applies = found[op].applies
            assert applies(meta(2, 16384)) and applies(meta(16385, 8)) and not applies(meta(2, 16385)), op
        softmax = found["scaled_masked_softmax"].applies
        assert softmax(meta(1, 1, 2, 16384), None, 1.0) and not softmax(meta(1, 1, 2, 16385), None, 1.0)
        assert not softmax(meta(1, 2, 16), None, 1.0)
        rope = found["rope"].applies
        assert rope(meta(4, 1, 2, 8), None, None) and not rope(meta(4, 2, 8), None, None)
        # Without Triton nothing is found, and the log says so.
        monkeypatch.setattr(device, "triton_available", lambda: False)
        find_kernel.cache_clear()
        with caplog.at_level(logging.INFO, logger=kernels.__name__):
            assert find_kernel("layer_norm") is None
        assert "no fused kernel for layer_norm; using the torch implementation" in caplog.messages
    finally:
        find_kernel.cache_clear()
