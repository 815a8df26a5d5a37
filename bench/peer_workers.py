"""DeepSpeed 0.19.8's training step for ``bench_peers.py``.

Imported only inside the peers' venv (``python bench/bench_peers.py --make-venv PATH``), in a worker
process whose ``torch.distributed`` gloo group is already up. megatron-core's step (and its CPU patches)
is in ``bench/step_builders.py``, shared with ``bench_gpu.py``.

DeepSpeed wraps the same Hugging Face GPT-2 the HF row uses, with torch's AdamW as its optimizer
(``zero_allow_untested_optimizer``: its fused Adam needs CUDA), and clips at 1.0, as ours and
megatron-core do.
"""
from __future__ import annotations

import torch
from step_builders import Batch, GPTShape, hf_gpt2


def deepspeed_step(shape: GPTShape, zero: int, global_batch: int, batch: Batch):
    """DeepSpeed's engine at ZeRO stage ``zero`` around Hugging Face's GPT-2, on CPU; this rank's rows of
    ``batch`` (inputs [global_batch, seq]). Returns a closure running one training step."""
    import deepspeed
    model = hf_gpt2(shape)
    world = torch.distributed.get_world_size()
    per_rank = global_batch // world
    ds_config = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": per_rank,
                 "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,
                 "gradient_clipping": 1.0, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                           config=ds_config, dist_init_required=False)
    inputs, _ = batch
    rank = torch.distributed.get_rank()
    mine = inputs[rank * per_rank:(rank + 1) * per_rank]

    def step() -> None:
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
    return step
