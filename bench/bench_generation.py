"""Greedy generation tokens/s: our GPTModel with and without the KV cache, against Hugging Face ``generate``.

The same random-weight GPT-2 (hidden 256, 4 layers, 4 heads, vocabulary 4096, 512 positions) is loaded
into both; a batch of 4 prompts of 32 tokens is continued by 96 tokens, greedy, 3 repetitions each,
in one process, alternating the three runs so machine noise hits all alike. Prints median tokens/s,
the ratios to Hugging Face (cache on), the peak RSS, and checks the three produce the same tokens.

Run: ``python bench/bench_generation.py`` (about a minute on 2 idle cores; ``--threads 1`` on a shared
machine, ``--new-tokens 32`` for a quick run).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MCORE_FORCE_CPU", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_core import parallel_state  # noqa: E402
from megatron_core.checkpoint import hf_gpt2  # noqa: E402
from megatron_core.checkpoint.sharding import rank_state_dict  # noqa: E402
from megatron_core.inference import generate  # noqa: E402
from megatron_core.models.gpt import GPTModel  # noqa: E402

BATCH, PROMPT, LAYERS, HIDDEN, HEADS, VOCAB, POSITIONS = 4, 32, 4, 256, 4, 4096, 512


def build(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
                                    n_head=HEADS, bos_token_id=0, eos_token_id=0)).eval()
    ps = parallel_state.get_parallel_state()
    config, vocab, positions = hf_gpt2.config_from_hf(hf.config)
    ours = GPTModel(config, vocab, positions, parallel_state=ps)
    full = hf_gpt2.state_to_core(hf.state_dict(), config)
    ours.load_state_dict(rank_state_dict(full, config, vocab, 128, 1, 0))
    return hf, ours.eval(), vocab


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1)
    hf, ours, vocab = build()
    prompts = torch.randint(1, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    runs = {
        "ours, KV cache": lambda: generate(ours, prompts.tolist(), n, eod_id=None, vocab_size=vocab).tokens,
        "ours, no cache": lambda: generate(ours, prompts.tolist(), n, eod_id=None, vocab_size=vocab,
                                           use_kv_cache=False).tokens,
        "HF generate (cache)": lambda: hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                   pad_token_id=0, attention_mask=torch.ones_like(prompts)).tolist(),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - start)
    same = outputs["ours, KV cache"] == outputs["ours, no cache"] == outputs["HF generate (cache)"]
    base = statistics.median(times["HF generate (cache)"])
    print(f"batch {BATCH} x prompt {PROMPT} + {n} new tokens, GPT-2 {LAYERS} layers hidden {HIDDEN}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:22s} {BATCH * n / t:9.1f} tokens/s   {t:7.3f} s   x{base / t:5.2f} vs HF")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"same tokens in all three: {same}")
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
