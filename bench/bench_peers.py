"""Training throughput of ours against megatron-core, DeepSpeed and Hugging Face, layout by layout.

Same model and batch for every system: GPT-2 architecture, batch 8 x sequence 256, 4 layers, hidden
256, 4 heads, vocabulary 4096, fp32, dropout 0.1, AdamW. Each (system, layout) run is a fresh set
of processes (one per rank, gloo) doing ``--warmup`` then ``--steps`` timed steps; systems are
alternated within each round and the rounds repeated (``--rounds``), so machine noise hits all of
them alike; the median tokens/s over rounds is printed with the ratio ours / peer and the peak
resident memory (VmHWM) of each rank.

Layouts (the issue's table): ``1p2t`` one process, 2 threads; ``1p1t`` one process, 1 thread;
``tp2`` TP 2; ``dp2-z0`` / ``dp2-z1`` / ``dp2-z2`` / ``dp2-z3`` DP 2 with ZeRO stage 0/1/2/3
(megatron-core's distributed optimizer is stage 1; it has no stage 2 or 3 here); ``pp2`` PP 2 with
4 microbatches. Ranks of a multi-process layout get 1 thread each.

Peers live only in the bench's own virtual environment, never in the project's dependencies:

    python bench/bench_peers.py --make-venv /tmp/peers-venv

creates it (a venv that sees this interpreter's site-packages, so torch and transformers are
shared, plus ``pip install megatron-core==0.16.1 deepspeed==0.19.8``, DeepSpeed built without
build isolation so it finds torch, with no compiled ops). Then

    python bench/bench_peers.py [--venv /tmp/peers-venv] [--layouts 1p2t,tp2] [--rounds 3] [--steps 5]

Without the venv only ours and Hugging Face run. Ours and megatron-core's steps come from
``bench/step_builders.py`` (shared with ``bench_gpu.py``); megatron-core runs on CPU with small
monkeypatches (see ``patch_megatron_for_cpu`` there): its CUDA RNG tracker and
``torch.cuda.current_device`` calls are redirected to the CPU. DeepSpeed's step is in ``bench/peer_workers.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ, LAYERS, HIDDEN, HEADS, VOCAB, DROPOUT = 8, 256, 4, 256, 4, 4096, 0.1
PEER_PINS = ["megatron-core==0.16.1", "deepspeed==0.19.8"]
# layout: (ranks, threads per rank, tp, pp, zero stage, microbatches, systems)
LAYOUTS = {
    "1p2t": (1, 2, 1, 1, 0, 1, ("ours", "mcore", "deepspeed", "hf")),
    "1p1t": (1, 1, 1, 1, 0, 1, ("ours", "mcore", "deepspeed", "hf")),
    "tp2": (2, 1, 2, 1, 0, 1, ("ours", "mcore")),
    "dp2-z0": (2, 1, 1, 1, 0, 1, ("ours", "mcore", "deepspeed")),
    "dp2-z1": (2, 1, 1, 1, 1, 1, ("ours", "mcore", "deepspeed")),
    "dp2-z2": (2, 1, 1, 1, 2, 1, ("ours", "deepspeed")),
    "dp2-z3": (2, 1, 1, 1, 3, 1, ("ours", "deepspeed")),
    "pp2": (2, 1, 1, 2, 0, 4, ("ours", "mcore")),
}
PEERS = {"mcore", "deepspeed"}


def make_venv(path: str) -> None:
    """Create the peers' venv at ``path`` (see the module docstring)."""
    import site
    venv.EnvBuilder(with_pip=True).create(path)
    py = os.path.join(path, "bin", "python")
    purelib = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      text=True).strip()
    with open(os.path.join(purelib, "project_site.pth"), "w") as f:
        f.write(site.getsitepackages()[0] + "\n")
    subprocess.check_call([py, "-m", "pip", "install", "-q", "wheel", "setuptools"])
    subprocess.check_call([py, "-m", "pip", "install", "-q", "--no-build-isolation", *PEER_PINS],
                          env={**os.environ, "DS_BUILD_OPS": "0"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(system: str, layout: str, args, python: str) -> dict | None:
    """Run one (system, layout) on fresh processes; rank 0's result dict, or None if it failed."""
    ranks, threads = LAYOUTS[layout][:2]
    port = _free_port()
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads),
               "MCORE_FORCE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
        cmd = [python, os.path.abspath(__file__), "--worker", system, "--layout", layout,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=args.timeout) for p in procs]
    for line in outs[0][0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {system} @ {layout} failed:\n    " + "\n    ".join(outs[0][1].strip().splitlines()[-6:]))
    return None


# ---- workers (run inside the launched processes) ----------------------------------------------

def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def _batch():
    import torch
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _hf_step(shape):
    import torch
    from step_builders import hf_gpt2
    model = hf_gpt2(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, _ = _batch()

    def step() -> None:
        model(input_ids=inputs, labels=inputs).loss.backward()  # HF shifts the labels itself
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _build_step(system: str, layout: str):
    """One training step of ``system`` at ``layout``: ours and megatron-core's from bench/step_builders.py
    (shared with bench_gpu.py), fp32; DeepSpeed's from peer_workers.py; Hugging Face's here."""
    from step_builders import GPTShape, Layout, mcore_step, ours_step
    shape = GPTShape(LAYERS, HIDDEN, HEADS, SEQ, VOCAB, DROPOUT)
    tp, pp, zero, micro = LAYOUTS[layout][2:6]
    if system == "ours":
        return ours_step(shape, Layout(tp, pp, zero, micro), _batch())
    if system == "mcore":
        return mcore_step(shape, Layout(tp, pp, zero, micro), _batch())
    if system == "hf":
        return _hf_step(shape)
    import peer_workers
    return peer_workers.deepspeed_step(shape, zero, BATCH, _batch())


def worker(system: str, layout: str, steps: int, warmup: int) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(LAYOUTS[layout][1])
    dist.init_process_group("gloo")
    step = _build_step(system, layout)
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    rss = [None] * dist.get_world_size()
    dist.all_gather_object(rss, _peak_rss_mib())
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tok_s": BATCH * SEQ / statistics.median(times), "rss_mib": rss}))
    dist.destroy_process_group()


def _print_table(results: dict, layouts: list[str]) -> None:
    print(f"\n{'layout':8s} {'system':10s} {'tokens/s':>9s} {'ours/peer':>10s}  peak RSS per rank (MiB)")
    for layout in layouts:
        ours = results.get((layout, "ours"))
        ours_med = statistics.median(r["tok_s"] for r in ours) if ours else None
        for system in LAYOUTS[layout][6]:
            runs = results.get((layout, system))
            if not runs:
                continue
            med = statistics.median(r["tok_s"] for r in runs)
            rss = [max(r["rss_mib"][i] for r in runs) for i in range(len(runs[0]["rss_mib"]))]
            ratio = "" if system == "ours" or ours_med is None else f"{ours_med / med:.2f}x"
            print(f"{layout:8s} {system:10s} {med:9.0f} {ratio:>10s}  {' / '.join(f'{m:.0f}' for m in rss)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--make-venv", metavar="PATH", help="create the peers' venv at PATH and exit")
    parser.add_argument("--venv", default="/tmp/peers-venv", help="the peers' venv (skipped if absent)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--systems", default="ours,mcore,deepspeed,hf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.layout, args.steps, args.warmup)
    if args.make_venv:
        return make_venv(args.make_venv)
    peer_python = os.path.join(args.venv, "bin", "python")
    have_peers = os.path.exists(peer_python)
    if not have_peers:
        print(f"no peers' venv at {args.venv} (create it: python bench/bench_peers.py --make-venv {args.venv}); "
              f"running ours and Hugging Face only")
    layouts = args.layouts.split(",")
    wanted = set(args.systems.split(","))
    results: dict = {}
    for rnd in range(args.rounds):
        for layout in layouts:
            systems = [s for s in LAYOUTS[layout][6] if s in wanted and (have_peers or s not in PEERS)]
            order = systems if rnd % 2 == 0 else systems[::-1]
            for system in order:
                out = launch(system, layout, args, peer_python if system in PEERS else sys.executable)
                if out is not None:
                    results.setdefault((layout, system), []).append(out)
                    print(f"round {rnd} {layout:7s} {system:10s} {out['tok_s']:8.0f} tokens/s", flush=True)
    print(f"GPT-2 shape: batch {BATCH} x seq {SEQ}, {LAYERS} layers, hidden {HIDDEN}, vocab {VOCAB}, fp32, "
          f"dropout {DROPOUT}; median over {args.rounds} rounds of {args.steps} steps (machine noise applies)")
    _print_table({k: v for k, v in results.items()}, layouts)


if __name__ == "__main__":
    main()
