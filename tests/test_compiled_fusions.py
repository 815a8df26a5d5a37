"""The tanh-GeLU and SwiGLU compiled by torch.compile for the CPU (megatron_core/fusions/compiled.py).

Values against float64 and against torch's eager op, forward and backward; a GPT-2 model with the
fusion against the same model without it; what happens without a C++ compiler (a real PATH
without g++, in a subprocess): the kernel is not offered, and a fusion whose compile fails logs one
line and gives the eager op's values.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from equivalence import assert_rel_close
from harness import run_distributed

from megatron_core import device, parallel_state
from megatron_core.fusions import compiled, find_kernel
from megatron_core.models.gpt import GPTModel
from megatron_core.models.presets import gpt2_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS32 = torch.finfo(torch.float32).eps
needs_compiler = pytest.mark.skipif(not device.cpu_compiler_available(), reason="no C++ compiler for inductor")


def _forward_backward(fn, x, grad):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


@needs_compiler
def test_gelu_tanh_fusion_against_float64_and_eager():
    """fp32 forward within 2 eps (1 + |y|) of float64 and the input gradient within 16 eps (1 + |dx|)
    (torch's eager op: 1 and 4 ulps here): the sigmoid form and the compiler's exp cost a few ulps
    of the gradient, nothing more. The compiled graph really ran (not the eager fallback)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 40, generator=g) * 3
    grad = torch.randn(64, 3, 40, generator=g)
    fusion = compiled.gelu_tanh_fusion()
    y, dx = _forward_backward(fusion, x, grad)
    assert fusion._ready == {(torch.float32, 3): True}
    y64, dx64 = _forward_backward(lambda t: F.gelu(t, approximate="tanh"), x.double(), grad.double())
    assert ((y.double() - y64).abs() <= 2 * EPS32 * (1 + y64.abs())).all()
    assert ((dx.double() - dx64).abs() <= 16 * EPS32 * (1 + dx64.abs())).all()
    # Another size and rank reuse the dynamic-shape graph (2-D is a second graph) and stay right.
    x2 = torch.randn(1000, 7, generator=g)
    y2, dx2 = _forward_backward(fusion, x2, torch.ones(1000, 7))
    ye, dxe = _forward_backward(lambda t: F.gelu(t, approximate="tanh"), x2, torch.ones(1000, 7))
    assert_rel_close(y2, ye, 1e-5, "2-D forward")
    assert_rel_close(dx2, dxe, 1e-5, "2-D input gradient")


@needs_compiler
def test_gelu_tanh_fusion_bf16():
    """bf16 in and out (computed in fp32 inside the loop): within one bf16 rounding of torch's
    eager bf16 op, forward and backward."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(32, 2, 48, generator=g) * 3).bfloat16()
    grad = torch.randn(32, 2, 48, generator=g).bfloat16()
    y, dx = _forward_backward(compiled.gelu_tanh_fusion(), x, grad)
    assert y.dtype == dx.dtype == torch.bfloat16
    y64, dx64 = _forward_backward(lambda t: F.gelu(t, approximate="tanh"), x.double(), grad.double())
    eps = torch.finfo(torch.bfloat16).eps
    assert ((y.double() - y64).abs() <= eps * (1 + y64.abs())).all()
    assert ((dx.double() - dx64).abs() <= 2 * eps * (1 + dx64.abs())).all()


@needs_compiler
def test_swiglu_fusion_against_float64():
    """silu(gate) * up of [..., 2f]: forward and input gradient within 4 eps (1 + |ref|) of float64
    (torch's eager op: within 2 here)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 3, 2 * 24, generator=g) * 3
    grad = torch.randn(16, 3, 24, generator=g)
    fusion = compiled.swiglu_fusion()
    y, dx = _forward_backward(fusion, x, grad)
    assert fusion._ready == {(torch.float32, 3): True} and y.shape == (16, 3, 24)
    y64, dx64 = _forward_backward(compiled.swiglu, x.double(), grad.double())
    assert ((y.double() - y64).abs() <= 4 * EPS32 * (1 + y64.abs())).all()
    assert ((dx.double() - dx64).abs() <= 4 * EPS32 * (1 + dx64.abs())).all()


def test_fusion_applies_only_to_large_training_tensors():
    big = torch.zeros(compiled.MIN_NUMEL, requires_grad=True)
    assert compiled.fusion_applies(big)
    assert not compiled.fusion_applies(torch.zeros(compiled.MIN_NUMEL - 1, requires_grad=True))
    assert not compiled.fusion_applies(torch.zeros(compiled.MIN_NUMEL))  # no gradient: generation, eval
    with torch.no_grad():
        assert not compiled.fusion_applies(big)
    assert not compiled.fusion_applies(big.detach().double().requires_grad_())


def _gpt_losses_and_grads(min_numel, steps=2):
    def run():
        compiled.MIN_NUMEL = min_numel  # this forked rank only
        ps = parallel_state.initialize_model_parallel(1)
        ps.manual_seed(3)
        model = GPTModel(gpt2_config(2, 32, 4, hidden_dropout=0.0, attention_dropout=0.0), 96, 16,
                         parallel_state=ps, make_vocab_size_divisible_by=32)
        used = model.decoder.layers[0].mlp.activation_kernel
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(5)
        losses, grads = [], {}
        for _ in range(steps):
            ids = torch.randint(0, 96, (2, 17), generator=g)
            loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        parallel_state.destroy_model_parallel()
        return losses, grads, used is not None and used.fn._ready.get((torch.float32, 3), False)
    return run_distributed(run, 1, timeout=240)[0]


@needs_compiler
def test_gpt2_model_with_the_fusion_equals_eager():
    """A GPT-2 model whose MLP activation takes the compiled fusion (threshold lowered to 1 element)
    gives the eager model's losses and gradients over two SGD steps at lr 0.5, within 1e-5."""
    eager_losses, eager_grads, eager_used = _gpt_losses_and_grads(min_numel=1 << 62)
    losses, grads, used = _gpt_losses_and_grads(min_numel=1)
    assert used and not eager_used
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for name, grad in eager_grads.items():
        assert_rel_close(grads[name], grad, 1e-5, name)


def _run_without_compiler(tmp_path, code):
    """``code`` in a fresh interpreter whose PATH holds no g++ (an empty directory)."""
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=240)


def test_without_a_compiler_the_kernel_is_not_offered(tmp_path):
    result = _run_without_compiler(tmp_path, """
        from megatron_core import device
        from megatron_core.fusions import find_kernel
        print(device.cpu_compiler_available(), find_kernel("gelu_tanh"))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "None"]


def test_a_failed_compile_logs_one_line_and_falls_back(tmp_path):
    """A fusion built anyway (the compiler vanished after the check) fails its probe compile, says so
    in one warning line and gives torch's eager values from then on."""
    result = _run_without_compiler(tmp_path, """
        import logging, torch, torch.nn.functional as F
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        from megatron_core.fusions import compiled
        fusion = compiled.gelu_tanh_fusion()
        x = torch.randn(8, 4, 4, requires_grad=True)
        y = fusion(x)
        y.sum().backward()
        print("same", torch.equal(y, F.gelu(x, approximate="tanh")), fusion._ready)
    """)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "megatron_core.fusions.compiled" in line]
    assert len(warnings) == 1 and "torch.compile of gelu_tanh failed" in warnings[0], result.stderr
    assert "same True {(torch.float32, 3): False}" in result.stdout


@needs_compiler
def test_kernel_is_offered_on_this_cpu_and_switched_off_by_the_environment(monkeypatch):
    find_kernel.cache_clear()
    try:
        assert find_kernel("gelu_tanh").name == "torch.compile gelu_tanh (CPU)"
        assert find_kernel("swiglu").name == "torch.compile swiglu (CPU)"
        monkeypatch.setenv("MCORE_COMPILED_FUSIONS", "0")
        find_kernel.cache_clear()
        assert find_kernel("gelu_tanh") is None and find_kernel("swiglu") is None
    finally:
        find_kernel.cache_clear()


def _no_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this backward does not compile")


@needs_compiler
def test_a_backward_that_fails_its_probe_falls_back_before_any_training_step(caplog):
    """The probe runs the compiled backward too: a fusion whose forward compiles but whose backward
    does not is never used (else the failure would come in the first training step's backward)."""
    fusion = compiled.CompiledFusion(lambda x: x * 2.0, _no_backward, lambda x: x * 2.0, "double")
    x = torch.randn(3, 4, requires_grad=True)
    with caplog.at_level("WARNING", logger="megatron_core.fusions.compiled"):
        y = fusion(x)
    y.sum().backward()
    assert fusion._ready == {(torch.float32, 2): False}
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_core.fusions.compiled"]
    assert len(lines) == 1 and "torch.compile of double failed (RuntimeError" in lines[0], lines
