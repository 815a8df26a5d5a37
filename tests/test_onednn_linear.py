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
