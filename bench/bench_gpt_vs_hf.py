"""Training-step throughput of our GPTModel against Hugging Face's GPT2LMHeadModel of the same shape.

One step is forward, backward and a torch AdamW step, fp32, batch 8 x sequence 256, 4 layers,
hidden 256, 4 heads, vocabulary 4096 (GPT-2 architecture: LayerNorm, tanh GeLU, learned positions,
tied output layer). The two models are stepped alternately in one process (A, B, A, B, ...) so
machine noise hits both alike; the ratio of median step times is printed, with the peak RSS of
each model measured in its own forked process (same parent state, so the numbers compare).

Run: ``python bench/bench_gpt_vs_hf.py`` (about a minute on 2 idle cores) or ``--quick``; on a
machine shared with other jobs ``--threads 1`` avoids OpenMP threads waiting on each other, which
makes both models several times slower and the ratio noise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MCORE_FORCE_CPU", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_core import parallel_state  # noqa: E402

BATCH, SEQ, LAYERS, HIDDEN, HEADS, VOCAB = 8, 256, 4, 256, 4, 4096


def build_ours(dropout: float) -> torch.nn.Module:
    from megatron_core.models.gpt import GPTModel
    from megatron_core.models.presets import gpt2_config
    config = gpt2_config(LAYERS, HIDDEN, HEADS, hidden_dropout=dropout, attention_dropout=dropout)
    model = GPTModel(config, VOCAB, SEQ, parallel_state=parallel_state.get_parallel_state())
    assert model.padded_vocab_size == VOCAB
    return model.train()


def build_hf(dropout: float) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
                        attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).float().train()
    assert model.config._attn_implementation == "sdpa"
    return model


def make_step(kind: str, model: torch.nn.Module):
    """A closure running one training step on a fixed batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step() -> float:
        if kind == "ours":
            loss = model(inputs, labels=labels).mean()
        else:
            loss = model(input_ids=inputs, labels=inputs).loss  # HF shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def peak_rss_mib(kind: str, dropout: float, steps: int) -> float:
    """Peak RSS (VmHWM) of a forked child that builds one model and runs ``steps`` steps."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(read_fd)
            step = make_step(kind, build_ours(dropout) if kind == "ours" else build_hf(dropout))
            for _ in range(steps):
                step()
            with open("/proc/self/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM")).split()[1]
            os.write(write_fd, hwm.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    data = os.read(read_fd, 64)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return int(data) / 1024 if data else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps each instead of 10")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout of both models")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 10)

    store = tempfile.NamedTemporaryFile(prefix="bench-store-", delete=False).name
    os.unlink(store)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1).manual_seed(1234)  # default and TP-rank dropout streams
    print(f"GPT-2 shape: batch {BATCH} x seq {SEQ}, {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, "
          f"vocab {VOCAB}, fp32, dropout {args.dropout}, torch threads {torch.get_num_threads()}")

    rss = {kind: peak_rss_mib(kind, args.dropout, 1 if args.quick else 2) for kind in ("ours", "hf")}
    steps_fn = {"ours": make_step("ours", build_ours(args.dropout)), "hf": make_step("hf", build_hf(args.dropout))}
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for i in range(steps + 2):  # two warm-up rounds
        for kind in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            start = time.perf_counter()
            steps_fn[kind]()
            if i >= 2:
                times[kind].append(time.perf_counter() - start)
    tokens = BATCH * SEQ
    median = {kind: statistics.median(t) for kind, t in times.items()}
    for kind, name in (("ours", "megatron_core GPTModel"), ("hf", "HF GPT2LMHeadModel")):
        print(f"{name:24s} {tokens / median[kind]:9.0f} tokens/s  (median step {median[kind] * 1e3:7.1f} ms "
              f"over {len(times[kind])})  peak RSS {rss[kind]:7.1f} MiB")
    print(f"ratio ours / HF: {median['hf'] / median['ours']:.2f}x tokens/s (target >= 1.2x)")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
