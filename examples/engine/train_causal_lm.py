"""Train a Hugging Face causal LM with megatron_core's DeepSpeed-style engine (ZeRO, mixed precision, clipping).

The plain PyTorch version of this script differs in five places, marked ``# engine:`` (docs/engine.md shows
the diff). Tokens are the bytes of a text file (vocabulary 256), so nothing is downloaded; the model is
built from a config with random weights. Run (2 processes on one machine):

    torchrun --standalone --nproc_per_node 2 examples/engine/train_causal_lm.py \
        --deepspeed --deepspeed_config examples/engine/ds_config.json --text README.md --epochs 1
"""

import argparse
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import megatron_core  # noqa: E402  (the checkout, when the library is not installed)


def main() -> None:
    """Parse the flags, build the model and data, train."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", required=True, help="a text file; its bytes are the tokens")
    parser.add_argument("--model-type", default="gpt2", choices=["gpt2", "llama"])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many micro batches")
    parser.add_argument("--save-dir", default=None)
    parser = megatron_core.add_config_arguments(parser)  # engine: --deepspeed --deepspeed_config FILE
    args = parser.parse_args()

    torch.manual_seed(0)
    sizes = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if args.model_type == "gpt2":
        # Bytes have no special tokens: GPT-2's default bos/eos id 50256 would lie outside the vocabulary
        # (transformers warns when the exported folder is loaded).
        sizes = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=args.seq_len,
                     bos_token_id=None, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(args.model_type, **sizes))
    with open(args.text, "rb") as f:
        tokens = torch.tensor(list(f.read()), dtype=torch.long)
    samples = [tokens[i : i + args.seq_len] for i in range(0, len(tokens) - args.seq_len, args.seq_len)]

    engine, optimizer, loader, _ = megatron_core.initialize(  # engine: replaces the optimizer and DataLoader
        model=model, model_parameters=model.parameters(), training_data=samples, config=args.deepspeed_config
    )

    micro_steps = 0
    for epoch in range(args.epochs):
        engine.train()
        for batch in loader:
            loss = engine(input_ids=batch, labels=batch).loss  # engine: engine(...) instead of model(...)
            engine.backward(loss)  # engine: instead of loss.backward()
            engine.step()  # engine: instead of optimizer.step(); optimizer.zero_grad()
            micro_steps += 1
            if args.max_steps is not None and micro_steps >= args.max_steps:
                break
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"epoch {epoch}: {engine.global_steps} optimizer steps, last loss {loss.item():.4f}", flush=True)
    if args.save_dir:
        # All ranks save; SAVE_DIR/zero_to_fp32.py (or tools/zero_to_fp32.py) then makes an HF folder.
        engine.save_checkpoint(args.save_dir)


if __name__ == "__main__":
    main()
