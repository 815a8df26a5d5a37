"""The CPU fp32 linear through oneDNN: values and gradients against float64, and when it is used."""
import pytest
import torch
import torch.nn.functional as F

from megatron_core.fusions import onednn_linear
from megatron_core.fusions.onednn_linear import input_grad, linear

EPS = torch.finfo(torch.float32).eps
# Each output is a 96-term fp32 dot product: summation error grows like sqrt(n) eps (~10 eps) of
# sum |x_i w_i| in the usual case; measured 1.8 eps for the output, 1.4-1.5 for the gradients (the
# same as F.linear's MKL kernel). A transposed weight, a lost bias or a wrong gradient is off by O(1).
BOUND = 8 * EPS

needs_onednn = pytest.mark.skipif(not onednn_linear.onednn_linear_available(),
                                  reason="this PyTorch build has no oneDNN linear op")


def _data(strided: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 96, generator=g).transpose(0, 1) if strided else torch.randn(16, 3, 96, generator=g)
    return x, torch.randn(80, 96, generator=g), torch.randn(80, generator=g), torch.randn(16, 3, 80, generator=g)


def _within(actual, exact, scale, what):
    if actual.numel() == 0:
        return
    ratio = ((actual.double() - exact).abs() / (EPS * scale)).max().item()
    assert ratio <= BOUND / EPS, f"{what}: {ratio:.2f} eps of sum |terms| (bound {BOUND / EPS:.0f})"


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_linear_and_its_gradients_match_float64(with_bias, strided):
    x, w, b, grad = _data(strided)
    b = b if with_bias else None
    ours = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = linear(*ours)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward", "fp32 CPU tensors must take the oneDNN path"
    out.backward(grad)
    exact = [t.double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = F.linear(*exact)
    ref.backward(grad.double())
    bias_abs = b.abs() if b is not None else 0.0
    _within(out, ref, x.abs() @ w.abs().t() + bias_abs, "output")
    _within(ours[0].grad, exact[0].grad, grad.abs() @ w.abs(), "input gradient")
    _within(ours[1].grad, exact[1].grad, grad.abs().reshape(-1, 80).t() @ x.abs().reshape(-1, 96), "weight gradient")
    if with_bias:
        _within(ours[2].grad, exact[2].grad, grad.abs().reshape(-1, 80).sum(0), "bias gradient")


@needs_onednn
def test_input_grad_is_grad_output_times_weight():
    x, w, _, grad = _data(False)
    _within(input_grad(grad, w), grad.double() @ w.double(), grad.abs() @ w.abs(), "grad_output @ weight")


def test_other_dtypes_and_the_switch_take_f_linear(monkeypatch):
    x, w, b, _ = _data(False)
    x64 = x.double().requires_grad_()
    assert type(linear(x64, w.double(), b.double()).grad_fn).__name__ != "_OneDNNLinearBackward"
    monkeypatch.setenv("MCORE_ONEDNN_LINEAR", "0")
    onednn_linear.onednn_linear_available.cache_clear()
    try:
        out = linear(x.requires_grad_(), w, b)
        assert type(out.grad_fn).__name__ != "_OneDNNLinearBackward", "MCORE_ONEDNN_LINEAR=0 must take F.linear"
        assert torch.equal(out, F.linear(x, w, b))
    finally:
        monkeypatch.undo()
        onednn_linear.onednn_linear_available.cache_clear()


def _operands(case):
    """x, weight, bias of an unusual or malformed linear call, all requiring gradients (views of
    leaves where the case is a view)."""
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*shape, generator=g).requires_grad_() for shape in ((4, 3, 8), (5, 8), (5,)))
    leaf = lambda *shape: torch.randn(shape, generator=g).requires_grad_()  # noqa: E731
    return {
        "strided bias": (x, w, leaf(10)[::2]),
        "expanded bias": (x, w, leaf(1).expand(5)),
        "0-d bias": (x, w, leaf()),
        "[1] bias": (x, w, leaf(1)),
        "[1, 5] bias": (x, w, b.view(1, 5)),
        "offset bias": (x, w, leaf(9)[1:6]),
        "bias of the wrong size": (x, w, leaf(3)),
        "1-d weight": (x, w[0], None),
        "3-d weight": (x, w.expand(2, 5, 8), None),
        "in-features mismatch": (x, w[:, :7], b),
        "no in-features": (x[..., :0], w[:, :0], b),
        "no out-features": (x, w[:0], b[:0]),
    }[case]


CASES = ["strided bias", "expanded bias", "0-d bias", "[1] bias", "[1, 5] bias", "offset bias",
         "bias of the wrong size", "1-d weight", "3-d weight", "in-features mismatch", "no in-features",
         "no out-features"]


@pytest.mark.parametrize("case", CASES)
def test_unusual_operands_behave_as_f_linear(case):
    """Whatever F.linear accepts gives its values and gradients (oneDNN's op reads a bias as `out`
    contiguous elements whatever its shape and strides, and rejects other shapes with "could not
    create a primitive descriptor"); whatever F.linear rejects raises its error, not oneDNN's."""
    operands = _operands(case)
    try:
        F.linear(*operands)
    except RuntimeError as e:
        with pytest.raises(RuntimeError) as ours:
            linear(*operands)
        assert str(ours.value) == str(e), f"{case}: {ours.value}"
        return
    given = [t for t in operands if t is not None]
    out = linear(*operands)
    exact = [t.detach().double().requires_grad_() if t is not None else None for t in operands]
    expected = F.linear(*exact)
    assert out.shape == expected.shape, case
    scale = F.linear(*(t.detach().abs().double() if t is not None else None for t in operands))
    _within(out, expected, scale, f"{case}: output")
    grads = torch.autograd.grad(out.sum(), given)
    exact_grads = torch.autograd.grad(expected.sum(), [t for t in exact if t is not None])
    for ours_g, exact_g in zip(grads, exact_grads, strict=True):
        assert ours_g.shape == exact_g.shape, case
        assert torch.allclose(ours_g.double(), exact_g, rtol=1e-5, atol=1e-5), f"{case}: gradient"


@pytest.mark.parametrize("case", ["1-d weight", "3-d weight", "in-features mismatch", "no out-features"])
def test_input_grad_of_unusual_operands_is_matmul(case):
    """input_grad(g, w) is g.matmul(w): its values, or its error."""
    _, w, _ = _operands(case)
    w = w.detach()
    grad = torch.randn(4, 3, w.shape[0] + (case == "in-features mismatch"))
    try:
        grad.matmul(w)
    except RuntimeError as e:
        with pytest.raises(RuntimeError) as ours:
            input_grad(grad, w)
        assert str(ours.value) == str(e), f"{case}: {ours.value}"
        return
    assert torch.allclose(input_grad(grad, w).double(), grad.double().matmul(w.double()), rtol=1e-5, atol=1e-5), case


@needs_onednn
@pytest.mark.parametrize("needs", ["x", "weight", "bias", "x+bias", "all"])
def test_keeps_for_backward_only_what_f_linear_keeps(needs):
    """A frozen weight's layer keeps no input for backward (no weight gradient to form), as F.linear."""
    def kept(fn):
        x, w, b = (torch.randn(*shape, requires_grad=name in needs or needs == "all")
                   for name, shape in (("x", (4, 3, 8)), ("weight", (5, 8)), ("bias", (5,))))
        storages = {x.untyped_storage().data_ptr(): "x", w.untyped_storage().data_ptr(): "weight"}
        names = set()

        def pack(t):
            names.add(storages.get(t.untyped_storage().data_ptr(), "other"))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x, w, b)
        return names, out
    names, out = kept(linear)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"
    assert names == kept(F.linear)[0], f"requires grad: {needs}"


@needs_onednn
def test_without_a_graph_the_same_values():
    """Under no_grad / inference_mode, or with nothing requiring a gradient, the product is the same
    oneDNN call without the autograd Function (full recompute's first forward runs under no_grad and
    must match its recomputation bitwise)."""
    x, w, b, _ = _data(True)
    with_graph = linear(x.requires_grad_(), w, b)
    assert type(with_graph.grad_fn).__name__ == "_OneDNNLinearBackward"
    with torch.no_grad():
        assert torch.equal(linear(x, w, b), with_graph)
    with torch.inference_mode():
        assert torch.equal(linear(x.detach(), w, b), with_graph)
    plain = linear(x.detach(), w, b)
    assert plain.grad_fn is None and torch.equal(plain, with_graph)


def test_autocast_is_honoured():
    """Under torch.autocast the layer is autocast's F.linear (bf16 product, bf16 output), as before."""
    x, w, b, _ = _data(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = linear(x, w.requires_grad_(), b), F.linear(x, w, b)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() on a CPU build
def test_torch_mkldnn_switch_is_honoured():
    """torch.backends.mkldnn.flags(enabled=False), torch's own off switch for oneDNN, gives F.linear."""
    x, w, b, _ = _data(False)
    with torch.backends.mkldnn.flags(enabled=False):
        out = linear(x.requires_grad_(), w, b)
        grad = input_grad(x.detach()[..., :80], w)
    assert type(out.grad_fn).__name__ != "_OneDNNLinearBackward" and torch.equal(out, F.linear(x, w, b))
    assert torch.equal(grad, x.detach()[..., :80].matmul(w))


@needs_onednn
def test_a_1d_input_takes_onednn():
    """x [in] (a single token's features) is a product oneDNN's op computes right: it goes there, with
    F.linear's values and gradients."""
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*shape, generator=g).requires_grad_() for shape in ((96,), (80, 96), (80,)))
    out = linear(x, w, b)
    assert out.shape == (80,) and type(out.grad_fn).__name__ == "_OneDNNLinearBackward"
    exact = [t.detach().double().requires_grad_() for t in (x, w, b)]
    expected = F.linear(*exact)
    _within(out, expected, F.linear(*(t.detach().abs().double() for t in (x, w, b))), "1-d input: output")
    for ours, ref in zip(torch.autograd.grad(out.sum(), (x, w, b)), torch.autograd.grad(expected.sum(), exact),
                         strict=True):
        assert ours.shape == ref.shape and torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5)
