"""The training and generation paths end to end on a CUDA device, for ``bench/bench_gpu.py e2e``.

The test suite runs every path on CPU with gloo; on a GPU these are what no test reaches:
``pretrain_gpt.py`` with real data (the demo's SentencePiece tokenizer and mmap dataset), bf16,
the fused kernels and checkpoints; a resume, which loads the optimizer state onto the device; the
same with ZeRO-1 and the optimizer on the host (``--optimizer-cpu-offload``), and with its copies
overlapped (``--overlap-cpu-optimizer-d2h-h2d``: CUDA streams, pinned memory, events), which must
give the same losses bit for bit; greedy generation
from the checkpoint with and without the KV cache. Each check prints ``PASS`` or ``FAIL`` with the
numbers it compared. Not a measurement: nothing here is timed.

Resume check: iterations 1..N in one run against 1..N/2 (``--exit-interval``), save, then a second
run resumed to N (the same flags otherwise, so the same learning-rate schedule); the
losses of N/2+1..N must agree within ``RESUME_RTOL`` relative (``--deterministic-mode`` and
cuBLAS's deterministic workspace are on, so any difference is a kernel that ignores them, and the
bound is there to tell that from a wrong resume, which moves the loss by far more).

``MCORE_FORCE_CPU=1`` runs it on CPU (a smoke test of the script before spending device time).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 20
RESUME_RTOL = 1e-3
PROMPT = "def main("
_LOSS = re.compile(r"iteration +(\d+)/ +\d+ \|.*?lm loss: (\S+) \|")


def _run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _train(cwd: str, save: str, extra: list[str]) -> dict[int, float]:
    """Train the demo model for ``ITERS`` (resuming from ``save`` if it holds a checkpoint); iteration -> loss."""
    proc = _run([os.path.join(ROOT, "pretrain_gpt.py"), "--demo", "--bf16", "--deterministic-mode",
                 "--train-iters", str(ITERS), "--lr-warmup-iters", "2", "--log-interval", "1",
                 "--eval-interval", "1000", "--eval-iters", "1", "--save", save, "--load", save,
                 "--save-interval", str(ITERS // 2), *extra], cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain_gpt.py {' '.join(extra)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {int(i): float(loss) for i, loss in _LOSS.findall(proc.stdout)}


def check_resume(cwd: str, label: str, extra: list[str]) -> dict[int, float] | None:
    """Uninterrupted against saved-and-resumed; PASS when the second half's losses agree. The
    uninterrupted run's losses, None on FAIL."""
    whole = _train(cwd, os.path.join(cwd, f"{label}-whole"), extra)
    split = os.path.join(cwd, f"{label}-split")
    first = _train(cwd, split, [*extra, "--exit-interval", str(ITERS // 2)])  # stops after saving half-way
    second = _train(cwd, split, extra)
    wanted = range(ITERS // 2 + 1, ITERS + 1)
    missing = [i for i in wanted if i not in whole or i not in second]
    if missing or sorted(first) != list(range(1, ITERS // 2 + 1)):
        print(f"FAIL {label}: iterations missing from the logs: {missing or sorted(first)}", flush=True)
        return None
    worst = max(abs(second[i] - whole[i]) / abs(whole[i]) for i in wanted)
    ok = worst <= RESUME_RTOL
    print(f"{'PASS' if ok else 'FAIL'} {label}: losses {whole[1]:.4f} -> {whole[ITERS]:.4f}; resumed at "
          f"{ITERS // 2}, iterations {wanted.start}-{ITERS} differ by at most {worst:.2e} relative "
          f"(bound {RESUME_RTOL:g})", flush=True)
    return whole if ok else None


def check_generation(cwd: str, load: str) -> bool:
    """Greedy continuation of a prompt from the checkpoint: the KV cache gives the same text as none."""
    outputs = []
    for extra in ([], ["--no-kv-cache"]):
        proc = _run([os.path.join(ROOT, "tools", "run_text_generation.py"), "--load", load, "--prompt", PROMPT,
                     "--top_k", "1", "--tokens-to-generate", "24", *extra], cwd)
        if proc.returncode != 0:
            print(f"FAIL generation {' '.join(extra)}: exit {proc.returncode}\n{proc.stderr[-2000:]}", flush=True)
            return False
        outputs.append(proc.stdout.strip())
    ok = outputs[0] == outputs[1] and len(outputs[0]) > len(PROMPT)
    print(f"{'PASS' if ok else 'FAIL'} generation: KV cache {outputs[0]!r}, no cache {outputs[1]!r}", flush=True)
    return ok


def e2e(args) -> dict:
    """Every check in a fresh temporary directory; the failed ones' names."""
    failed, whole = [], {}
    offload = ["--use-distributed-optimizer", "--optimizer-cpu-offload"]
    with tempfile.TemporaryDirectory() as cwd:
        for label, extra in [("bf16", []), ("bf16-zero1-cpu-offload", offload),
                             ("bf16-zero1-cpu-offload-overlap", [*offload, "--overlap-cpu-optimizer-d2h-h2d"])]:
            try:
                whole[label] = check_resume(cwd, label, extra)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"FAIL {label}: {exc}", flush=True)
                whole[label] = None
            if whole[label] is None:
                failed.append(label)
        # The overlapped copies (a side stream, pinned host memory, events) change when, not what.
        plain, overlap = whole["bf16-zero1-cpu-offload"], whole["bf16-zero1-cpu-offload-overlap"]
        if plain is not None and overlap is not None:
            same = plain == overlap
            print(f"{'PASS' if same else 'FAIL'} offload overlap: losses {'identical to' if same else 'differ from'} "
                  f"the offload without it", flush=True)
            if not same:
                failed.append("offload-overlap-identical")
        if not check_generation(cwd, os.path.join(cwd, "bf16-whole")):
            failed.append("generation")
    return dict(failed=failed)
