"""The same Hugging Face GPT-2 trained through our engine and through DeepSpeed, ZeRO 0-3, 2 ranks.

Shape (REFERENCE.md's): batch 8 x sequence 256 (4 per rank), 4 layers, hidden 256, FFN 1024, vocabulary
4096, tied embeddings, dropout 0, fp32, AdamW (DeepSpeed with ``torch_adam``, no compiled ops), one
DeepSpeed JSON config for both. For each stage the two run alternately (ours, DeepSpeed, ours, ...)
under ``torchrun --nproc_per_node 2`` with gloo on the CPU; each prints tokens/s (rank 0, after
``--warmup`` steps) and peak resident memory per rank. The table gives the ratio ours / DeepSpeed.

DeepSpeed never goes into the project's environment. Make its own venv once (it reuses the project's
torch and transformers through a .pth file, so pip only adds DeepSpeed and its small dependencies)::

    python -m venv /tmp/ds-bench-venv
    /work/venv/bin/python -c "import site; print(site.getsitepackages()[0])" \\
        > /tmp/ds-bench-venv/lib/python3.11/site-packages/work_venv.pth
    DS_BUILD_OPS=0 /tmp/ds-bench-venv/bin/pip install deepspeed==0.19.8

The first DeepSpeed run compiles its CPU communication op (a minute or more on a busy machine) into
``/tmp/ds-bench-venv/torch_extensions``.

Run: ``python bench/bench_engine_vs_deepspeed.py [--stages 0 1 2 3] [--steps 10] [--rounds 2]``.
Without that venv (``--ds-python``) the DeepSpeed column says how to make it and ours still runs.
A stage our library does not implement yet (3) is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_PYTHON = "/tmp/ds-bench-venv/bin/python"
BATCH, MICRO, SEQ, LAYERS, HIDDEN, HEADS, VOCAB = 8, 4, 256, 4, 256, 4, 4096


def ds_config(stage: int) -> dict:
    return {
        "train_batch_size": BATCH,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }


def build_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).float().train()


def worker(impl: str, stage: int, steps: int, warmup: int) -> None:
    """One rank under torchrun: train, print one JSON line with tokens/s and peak RSS."""
    import torch
    import torch.distributed as dist

    model = build_model()
    if impl == "ours":
        sys.path.insert(0, ROOT)
        import megatron_core
        from megatron_core.errors import ConfigError

        try:
            engine, _, _, _ = megatron_core.initialize(model, config=ds_config(stage))
        except ConfigError as exc:
            print("RESULT " + json.dumps({"error": str(exc)}), flush=True)
            return
    else:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config(stage)
        )
    rank = dist.get_rank()
    ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=torch.Generator().manual_seed(rank))
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
            start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps(
            {"rank": rank, "tokens_per_s": BATCH * SEQ * steps / elapsed, "peak_mib": peak_mib, "loss": float(loss)}
        ),
        flush=True,
    )


def launch(python: str, impl: str, stage: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo"}
    if impl == "deepspeed":
        # DeepSpeed JIT-builds its CPU shared-memory op on first use; keep the build in its own venv,
        # not in the user's shared ~/.cache/torch_extensions (a build killed there leaves a lock behind).
        env["TORCH_EXTENSIONS_DIR"] = os.path.join(os.path.dirname(os.path.dirname(python)), "torch_extensions")
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.abspath(__file__),
        "--worker",
        impl,
        "--stage",
        str(stage),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if any("error" in r for r in results):
        return {"error": results[0]["error"]}
    if proc.returncode != 0 or len(results) != 2:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    by_rank = sorted(results, key=lambda r: r["rank"])
    return {
        "tokens_per_s": by_rank[0]["tokens_per_s"],
        "peak_mib": [r["peak_mib"] for r in by_rank],
        "loss": by_rank[0]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternations per stage (medians are reported)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    parser.add_argument("--ds-python", default=DS_PYTHON, help="the DeepSpeed venv's python (see the docstring)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--worker", choices=["ours", "deepspeed"], help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.stage, args.steps, args.warmup)
        return
    have_ds = os.path.exists(args.ds_python)
    if not have_ds:
        print(
            f"DeepSpeed venv not found at {args.ds_python}: create it with the commands in this script's "
            f"docstring; running ours only."
        )
    print(f"GPT-2 {LAYERS}x{HIDDEN}, batch {BATCH}x{SEQ}, 2 ranks x {args.threads} thread(s), {args.steps} steps")
    print(f"{'stage':>5} | {'ours tok/s':>10} | {'DS tok/s':>9} | {'ratio':>5} | ours peak MiB/rank | DS peak MiB/rank")
    for stage in args.stages:
        runs: dict[str, list[dict]] = {"ours": [], "deepspeed": []}
        for _ in range(args.rounds):
            runs["ours"].append(launch(sys.executable, "ours", stage, args))
            if have_ds:
                runs["deepspeed"].append(launch(args.ds_python, "deepspeed", stage, args))
        print(_row(stage, runs))


def _summary(results: list[dict]) -> tuple[str, str, float | None]:
    if not results:
        return "-", "-", None
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return "error", errors[0][:100], None
    tps = statistics.median(r["tokens_per_s"] for r in results)
    mem = "/".join(f"{max(r['peak_mib'][i] for r in results):.0f}" for i in range(2))
    return f"{tps:.0f}", mem, tps


def _row(stage: int, runs: dict[str, list[dict]]) -> str:
    ours, ours_mem, ours_tps = _summary(runs["ours"])
    ds, ds_mem, ds_tps = _summary(runs["deepspeed"])
    ratio = f"{ours_tps / ds_tps:.2f}" if ours_tps and ds_tps else "-"
    return f"{stage:>5} | {ours:>10} | {ds:>9} | {ratio:>5} | {ours_mem} | {ds_mem}"


if __name__ == "__main__":
    main()
