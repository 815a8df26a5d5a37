"""Resume a real DeepSpeed checkpoint in DeepSpeed and in this engine; compare the continuations.

One rank under torchrun (gloo, CPU). ``--impl deepspeed`` runs in the peers' venv (DeepSpeed 0.19.8,
never a project dependency); ``--impl ours`` in the project's. Phases:

- ``save`` (deepspeed only): train ``--steps`` steps from seed 0, ``save_checkpoint(--dir, client_state=...)``;
- ``resume``: build the model from another seed, ``load_checkpoint(--dir)``, train ``--steps`` more steps;
  rank 0 writes the losses, lr, counters, client_state and the final full parameters to ``--out`` (torch.save).

    torchrun --nproc_per_node 2 bench/ds_checkpoint_peer.py --impl deepspeed --phase save --zero 2 --dir D --out X
    torchrun --nproc_per_node 2 bench/ds_checkpoint_peer.py --impl deepspeed --phase resume --zero 2 --dir D --out A
    torchrun --nproc_per_node 2 bench/ds_checkpoint_peer.py --impl ours --phase resume --zero 2 --dir D --out B

(run DeepSpeed with ``DS_ACCELERATOR=cpu``; ``--model mlp|gpt2``, ``--dtype fp32|bf16|fp16``; docs/engine.md,
"Checkpoints DeepSpeed wrote", records the results). The data is the same rows for both: step ``s`` uses a global
batch drawn from seed ``1000 + s`` and each rank takes its rows.
"""
from __future__ import annotations

import argparse

import torch

GLOBAL_BATCH = 8


def mlp() -> torch.nn.Module:
    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(16, 48)
            self.fc2 = torch.nn.Linear(48, 40)
            self.head = torch.nn.Linear(40, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x = x.to(self.fc1.weight.dtype)  # bf16 training: DeepSpeed casts the weights, not the inputs
            h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
            return torch.nn.functional.mse_loss(self.head(h).squeeze(-1).float(), y)
    return MLP()


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def batch(model_kind: str, step: int, rank: int, world: int) -> tuple:
    g = torch.Generator().manual_seed(1000 + step)
    per = GLOBAL_BATCH // world
    if model_kind == "mlp":
        x = torch.randn(GLOBAL_BATCH, 16, generator=g)
        y = torch.randn(GLOBAL_BATCH, generator=g)
        return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    ids = torch.randint(0, 96, (GLOBAL_BATCH, 12), generator=g)
    return (ids[rank * per:(rank + 1) * per],)


def config(zero: int, world: int, dtype: str, grad_accum_dtype: str | None = None, hysteresis: int = 2) -> dict:
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                    "weight_decay": 0.01, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                        "warmup_num_steps": 10}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":  # a short window and hysteresis 2: the scaler grows and backs off within a few steps
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 2, "hysteresis": hysteresis}
    if grad_accum_dtype is not None:  # "fp32" with bf16 at ZeRO-1: DeepSpeed's BF16_Optimizer
        cfg["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    return cfg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["deepspeed", "ours"], required=True)
    p.add_argument("--phase", choices=["save", "resume"], required=True)
    p.add_argument("--model", choices=["mlp", "gpt2"], default="mlp")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--grad-accum-dtype", default=None)
    p.add_argument("--hysteresis", type=int, default=2)
    p.add_argument("--freeze", action="store_true", help="fc1.bias frozen (requires_grad=False)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0 if args.phase == "save" else 123)
    model = mlp() if args.model == "mlp" else gpt2()
    if args.freeze:
        model.fc1.bias.requires_grad_(False)
    if args.impl == "deepspeed":
        import deepspeed as lib
        gathered = lib.zero.GatheredParameters
    else:
        import megatron_core as lib  # type: ignore[no-redef]
        from megatron_core.zero import GatheredParameters as gathered
    kwargs = {"dist_init_required": False} if args.impl == "deepspeed" else {}
    cfg = config(args.zero, world, args.dtype, args.grad_accum_dtype, args.hysteresis)
    engine, _, _, _ = lib.initialize(model=model, model_parameters=model.parameters(), config=cfg, **kwargs)
    first = 0
    client = None
    if args.phase == "resume":
        path, client = engine.load_checkpoint(args.dir)
        first = client["next_step"]
    losses, scales = [], []
    for s in range(first, first + args.steps):
        inputs = batch(args.model, s, rank, world)
        out = engine(*inputs) if args.model == "mlp" else engine(input_ids=inputs[0], labels=inputs[0])
        loss = out if args.model == "mlp" else out.loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float().item())
        scales.append(engine.get_loss_scale() if args.impl == "ours"  # BF16_Optimizer has no scale: 1
                      else getattr(engine.optimizer, "loss_scale", 1.0))
    if args.phase == "save":
        engine.save_checkpoint(args.dir, client_state={"next_step": first + args.steps, "note": "ds"})
    params = list(engine.module.parameters())
    with gathered(params, modifier_rank=None):
        full = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"losses": losses, "scales": scales, "skipped": engine.skipped_steps, "params": full,
                    "client": client, "lr": engine.get_lr(),
                    "global_steps": engine.global_steps, "global_samples": engine.global_samples}, args.out)
        print("losses", losses, "loss scales", scales, flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
