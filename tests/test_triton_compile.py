"""Every Triton kernel of ``megatron_core.fusions`` compiles for a Hopper GPU (sm_90), on this CPU.

Triton's interpreter (``tests/test_triton_kernels.py``) runs a kernel's Python, not its compiler:
code the compiler refuses (a non-constexpr global, a dtype clash between branches, an op with no
lowering) passes there and fails only on a GPU. ``triton.compile`` needs no device, so here each
kernel is compiled down to a cubin (Triton's bundled ptxas) for every constexpr combination and
data dtype the launch sites use. Runs in a subprocess: the interpreter tests set
``TRITON_INTERPRET=1`` for the whole session, and under it ``@triton.jit`` gives kernels that
cannot be compiled. Skipped when triton is not installed.
"""
import importlib
import os
import subprocess
import sys

import pytest

PTR = "*{dtype}"
# kernel -> (argument types, with {dtype} the data dtype; constexpr variants the launch sites use)
KERNELS = {
    "triton_norms._norm_fwd": (
        dict(X=PTR, Y=PTR, W=PTR, B=PTR, Mean="*fp32", Rstd="*fp32", N="i32", eps="fp32"),
        [dict(HAS_BIAS=True, RMS=False), dict(HAS_BIAS=False, RMS=False), dict(HAS_BIAS=False, RMS=True)]),
    "triton_norms._norm_bwd": (
        dict(X=PTR, DY=PTR, DX=PTR, W=PTR, Mean="*fp32", Rstd="*fp32", DW="*fp32", DB="*fp32", M="i32", N="i32",
             ROWS="i32"),
        [dict(HAS_BIAS=True, RMS=False), dict(HAS_BIAS=False, RMS=False), dict(HAS_BIAS=False, RMS=True)]),
    "triton_norms._softmax_fwd": (
        dict(X=PTR, Y=PTR, MASK="*u8", H="i32", SQ="i32", SK="i32", msb="i32", msh="i32", msq="i32", msk="i32",
             scale="fp32"),
        [dict(HAS_MASK=True, CAUSAL=False), dict(HAS_MASK=False, CAUSAL=True)]),
    "triton_norms._softmax_bwd": (
        dict(DY=PTR, Y=PTR, DX=PTR, MASK="*u8", H="i32", SQ="i32", SK="i32", msb="i32", msh="i32", msq="i32",
             msk="i32", scale="fp32"),
        [dict(HAS_MASK=True, CAUSAL=False), dict(HAS_MASK=False, CAUSAL=True)]),
    "triton_elementwise._rope": (
        dict(X=PTR, Y=PTR, COS="*fp32", SIN="*fp32", HEADS="i32", D="i32", ROT="i32"),
        [dict(BACKWARD=False, HEADS_BLOCK=32, HALF_BLOCK=64, REST_BLOCK=1),
         dict(BACKWARD=True, HEADS_BLOCK=8, HALF_BLOCK=32, REST_BLOCK=64)]),
    "triton_elementwise._swiglu_fwd": (dict(X=PTR, Y=PTR, F="i32"), [{}]),
    "triton_elementwise._swiglu_bwd": (dict(X=PTR, DY=PTR, DX=PTR, F="i32"), [{}]),
    "triton_elementwise._bda": (
        dict(X=PTR, BIAS=PTR, RES=PTR, DY=PTR, OUT=PTR, SEED="*i32", N="i64", H="i32", p="fp32", scale="fp32"),
        [dict(HAS_BIAS=True, BACKWARD=False), dict(HAS_BIAS=False, BACKWARD=False),
         dict(HAS_BIAS=False, BACKWARD=True)]),
    "triton_cross_entropy._row_stats": (
        dict(X=PTR, TARGET="*i32", MAX="*fp32", SUM_EXP="*fp32", SUM_X="*fp32", PRED="*fp32", V="i32"), [{}]),
    "triton_cross_entropy._grad": (
        dict(X=PTR, MAX="*fp32", SUM_EXP="*fp32", TARGET="*i32", DY="*fp32", DX=PTR, V="i32", smooth_target="fp32",
             smooth_all="fp32"), [{}]),
}
DTYPES = ("bf16", "fp16", "fp32")
NUM_WARPS = {"triton_norms._norm_bwd": 16}  # the launch sites' num_warps for BLOCK 2048 (8 elsewhere)


def compile_all() -> list[str]:
    """Compile every (kernel, variant, dtype); the failures as one line each."""
    import triton
    from triton.backends.compiler import GPUTarget

    from megatron_core.fusions.triton_norms import num_warps
    target = GPUTarget("cuda", 90, 32)
    failures = []
    for name, (types, variants) in KERNELS.items():
        module, fn_name = name.split(".")
        fn = getattr(importlib.import_module(f"megatron_core.fusions.{module}"), fn_name)
        params = fn.arg_names
        for variant in variants:
            constexprs = dict(variant)
            if "BLOCK" in params:
                constexprs["BLOCK"] = 2048
            missing = [p for p in params if p not in types and p not in constexprs]
            if missing:
                failures.append(f"{name}: no type for {missing} in this test's table")
                continue
            for dtype in DTYPES:
                signature = {p: types[p].format(dtype=dtype) if p in types else "constexpr" for p in params}
                try:
                    triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                   target=target, options=dict(num_warps=NUM_WARPS.get(name, num_warps(2048))))
                except Exception as e:  # noqa: BLE001 (any compiler error is the finding)
                    first = str(e).strip().splitlines()
                    failures.append(f"{name} {variant} {dtype}: {type(e).__name__}: {' | '.join(first[-3:])}")
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
