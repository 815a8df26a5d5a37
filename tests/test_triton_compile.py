"""Every Triton kernel of ``megatron_core.fusions`` compiles for a Hopper GPU (sm_90), on this CPU,
as its launch sites launch it.

Triton's interpreter (``tests/test_triton_kernels.py``) runs a kernel's Python, not its compiler:
code the compiler refuses (a non-constexpr global, a dtype clash between branches, an op with no
lowering) passes there and fails only on a GPU. ``triton.compile`` needs no device, so here each
public op (``layer_norm``, ``rms_norm``, ``scaled_masked_softmax``, ``apply_rotary_pos_emb``,
``swiglu``, ``bias_dropout_add``, ``vocab_parallel_cross_entropy``) is called forward and backward on
CPU tensors with every kernel's launch recorded instead of run, and each recorded launch is compiled
down to a cubin (Triton's bundled ptxas) with the types, constexprs and ``num_warps`` a launch on a
GPU would compile: Triton's own argument specialization, so an int argument equal to 1 (one head
per rank, one row per norm-backward program, a mask's unit stride) is a constexpr there too, and
pointers and ints divisible by 16 carry that attribute. A ``@triton.jit`` function that no call
launches and no kernel calls fails the test. Each compiled launch's PTX then goes through ptxas -v
(the one Triton uses for sm_90): a kernel that spills registers to local memory, or takes more than
``MAX_REGISTERS`` a thread, fails the test. These kernels are memory-bound: a tile that grows past
what a thread holds leaves too few warps on a multiprocessor to hide memory latency (RoPE's
whole-position tile took all 255 registers at 128 heads x 128 before it was capped; the softmax at
rows of 16384 took 178 with 8 warps). Runs in a subprocess: the interpreter tests set
``TRITON_INTERPRET=1`` for the whole session, and under it ``@triton.jit`` gives kernels that
cannot be compiled. Skipped when triton is not installed.
"""
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile

import pytest

MODULES = ("triton_norms", "triton_elementwise", "triton_cross_entropy")
DTYPES = ("bfloat16", "float16", "float32")
MAX_REGISTERS = 128  # a multiprocessor's 65,536 registers then keep at least 16 warps resident


def _record_launches(launches: list) -> None:
    """Replace every kernel's launch by one that appends (kernel, arguments, options) to ``launches``."""
    for qualified, fn in _jit_functions().items():
        params = list(inspect.signature(fn.fn).parameters)

        def run(*args, grid, warmup, fn=fn, params=params, qualified=qualified, **kwargs):
            bound = dict(zip(params, args, strict=False))
            bound.update((k, v) for k, v in kwargs.items() if k in params)
            options = {k: v for k, v in kwargs.items() if k not in params}
            launches.append((qualified, fn, bound, options))
        fn.run = run


def _call_launch_sites(dtype) -> None:
    """Each public op forward and backward at training-like shapes (kernels recorded, not run)."""
    import torch

    from megatron_core.fusions import triton_cross_entropy as tce
    from megatron_core.fusions import triton_elementwise as tel
    from megatron_core.fusions import triton_norms as tno

    def leaf(*shape):
        return torch.zeros(*shape, dtype=dtype, requires_grad=True)

    def backward(out):
        out.backward(torch.ones_like(out))

    x, w, b = leaf(8, 4096), leaf(4096), leaf(4096)  # hidden 4096: the norm backward's 16 warps
    backward(tno.layer_norm(x, w, b, 1e-5, bwd_programs=8))  # one row per program: ROWS == 1, a constexpr
    backward(tno.layer_norm(x, w, None, 1e-5, bwd_programs=2))
    backward(tno.rms_norm(x, w, 1e-5))  # as the model calls it (programs per multiprocessor)
    scores = leaf(2, 4, 16, 2048)
    backward(tno.scaled_masked_softmax(scores, None, 0.125))  # causal
    backward(tno.scaled_masked_softmax(scores, torch.zeros(2, 1, 1, 2048, dtype=torch.bool), 0.125))
    backward(tno.layer_norm(leaf(8, 16384), leaf(16384), leaf(16384), 1e-5))  # kernels.py's longest row
    backward(tno.scaled_masked_softmax(leaf(1, 1, 2, 16384), None, 0.125))
    cos, sin = torch.zeros(4, 1, 1, 128), torch.zeros(4, 1, 1, 128)
    backward(tel.apply_rotary_pos_emb(leaf(4, 2, 32, 128), cos, sin))
    backward(tel.apply_rotary_pos_emb(leaf(4, 2, 128, 128), cos, sin))  # many heads: tiles over heads
    backward(tel.apply_rotary_pos_emb(leaf(4, 2, 1, 128), cos[..., :64], sin[..., :64]))  # one head, partial
    backward(tel.swiglu(leaf(8, 2 * 11008)))
    backward(tel.bias_dropout_add(leaf(4, 2, 4096), leaf(4096), leaf(4, 2, 4096), 0.1))
    backward(tel.bias_dropout_add(leaf(4, 2, 4096), None, leaf(4, 2, 4096), 0.1))
    target = torch.zeros(8, dtype=torch.int64)
    backward(tce.vocab_parallel_cross_entropy(leaf(8, 50304), target, None, 0.1))


def _jit_functions() -> dict:
    """``{"module.name": JITFunction}`` of every ``@triton.jit`` function in :data:`MODULES`."""
    import triton

    return {f"{module}.{name}": fn for module in MODULES
            for name, fn in vars(importlib.import_module(f"megatron_core.fusions.{module}")).items()
            if isinstance(fn, triton.runtime.jit.JITFunction)}


def _register_use(ptx: str, arch: int) -> tuple[int, int]:
    """(registers a thread, bytes of spill stores) that ptxas -v reports for ``ptx`` on sm_``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", path, "-o", path + ".cubin"],
                              capture_output=True, text=True, check=True)
    report = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    assert registers and spills, report
    return int(registers.group(1)), int(spills.group(1))


def compile_all() -> list[str]:
    """Compile every distinct recorded launch; the failures as one line each."""
    import torch
    import triton
    from triton._C.libtriton import native_specialize_impl  # what a launch's argument binder calls
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    launches: list = []
    _record_launches(launches)
    for dtype in DTYPES:
        _call_launch_sites(getattr(torch, dtype))
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    failures, done = [], set()
    for name, fn, bound, options in launches:
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.arg_names):
            kind, attr = ("constexpr", None) if fn.params[i].is_constexpr else native_specialize_impl(
                backend, bound[p], False, True, True)
            signature[p] = kind
            if kind == "constexpr":
                constexprs[(i,)] = bound[p]
            elif isinstance(attr, str) and attr:  # "D": divisible by 16, as a launch specializes it
                attrs[(i,)] = backend.parse_attr(attr)
        key = (name, tuple(signature.items()), tuple(constexprs.items()), str(attrs), tuple(sorted(options.items())))
        if key in done:
            continue
        done.add(key)
        types = {p: t for p, t in signature.items() if t != "constexpr"}
        values = {fn.arg_names[i]: v for (i,), v in constexprs.items()}
        try:
            kernel = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                              attrs=attrs), target=target, options=options)
        except Exception as e:  # noqa: BLE001 (any compiler error is the finding)
            lines = str(e).strip().splitlines()
            failures.append(f"{name} {types} {values} {options}: {type(e).__name__}: {' | '.join(lines[-3:])}")
            continue
        registers, spilled = _register_use(kernel.asm["ptx"], target.arch)
        print(f"{name} {values} {options}: {registers} registers, {spilled} bytes spilled")
        if spilled or registers > MAX_REGISTERS:
            failures.append(f"{name} {types} {values} {options}: {registers} registers a thread (at most "
                            f"{MAX_REGISTERS}), {spilled} bytes spilled: give each thread fewer elements")
    launched = {name for name, *_ in launches}
    jit_functions = _jit_functions()
    for name in jit_functions:
        # A device function (called from another kernel) is compiled with its caller.
        called = any(name.split(".")[1] + "(" in other.src for other_name, other in jit_functions.items()
                     if other_name != name)
        if name not in launched and not called:
            failures.append(f"{name}: no call in this test launches it (add one to _call_launch_sites)")
    print(f"{len(done)} launches compiled ({len(launches)} recorded)")
    return failures


def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


if __name__ == "__main__":
    problems = compile_all()
    print("\n".join(problems) or "all kernels compiled")
    sys.exit(1 if problems else 0)
