"""Shared pieces of the engine tests (no tests here): tiny models, their data, and the plain PyTorch reference.

A model kind is ``"mlp"``, ``"gpt2"`` or ``"llama"`` (tiny Hugging Face models with random weights from
``hf_testing``). The global batch of step ``s`` is drawn from a generator seeded with ``s``; micro
batch ``j`` of it is rows ``[j * MICRO, (j + 1) * MICRO)``, and on the engine DP rank ``r`` runs micro
batches ``j = k * dp + r`` for its micro steps ``k``. The reference is the loop a user writes without
the engine: one process, the whole global batch as ``dp * ga`` micro batches, ``(loss / n).backward()``,
``clip_grad_norm_`` and ``torch.optim.AdamW(model.parameters(), ...)``: one param group, every parameter
decayed (biases too), as DeepSpeed builds the config's optimizer without ``model_parameters``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from hf_testing import tiny_hf_gpt2, tiny_hf_llama

from megatron_core.errors import ConfigError

MICRO = 2
SEQ = 8
VOCAB = 64
OPT = {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}
# The Adam caveat: GPT-2's key bias gets a gradient that is zero up to rounding (softmax is invariant
# to it), and Adam's 1/sqrt(v) + eps turns that reduction-order noise into lr-sized steps. Even with
# eps 1e-4, compared element-wise, GPT-2 at DP 4 missed 1e-5 (1.4e-5 on attn.c_proj.bias, measured),
# so the HF models train with SGD (momentum 0.9, no weight decay); the MLP keeps AdamW.
HF_OPT = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}}
CLIP = 0.5


SGD = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}}


def opt_for(kind: str) -> dict:
    return OPT if kind == "mlp" else HF_OPT


def make_model(kind: str) -> torch.nn.Module:
    """A fresh model with fixed random weights."""
    if kind == "mlp":
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
        )
    if kind == "gpt2":
        return tiny_hf_gpt2(vocab_size=VOCAB, hidden=32, layers=1, heads=4, positions=16)
    return tiny_hf_llama(vocab_size=VOCAB, hidden=32, layers=1, heads=4, kv_heads=2, ffn=48, positions=16)


def global_batch(kind: str, step: int, size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    if kind == "mlp":
        return {"x": torch.randn(size, 8, generator=gen), "y": torch.randn(size, 4, generator=gen)}
    return {"ids": torch.randint(0, VOCAB, (size, SEQ), generator=gen)}


def micro_batch(batch: dict[str, torch.Tensor], j: int) -> dict[str, torch.Tensor]:
    return {k: v[j * MICRO : (j + 1) * MICRO] for k, v in batch.items()}


def loss_of(kind: str, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The user's forward and loss (the engine or the bare model as ``model``)."""
    if kind == "mlp":
        out = model(batch["x"].to(next(iter(model.parameters())).dtype))
        return torch.nn.functional.mse_loss(out.float(), batch["y"])
    return model(input_ids=batch["ids"], labels=batch["ids"]).loss.float()


def reference(kind: str, steps: int, num_micro: int, clip: float = CLIP, opt: dict | None = None) -> dict:
    """Plain PyTorch on one process over ``num_micro`` micro batches per step (AdamW, or SGD if ``opt`` says)."""
    model = make_model(kind).train()
    params = dict(model.named_parameters())
    opt = opt or opt_for(kind)
    p = opt["params"]
    groups = list(params.values())
    if opt["type"] == "SGD":
        optim: torch.optim.Optimizer = torch.optim.SGD(groups, lr=p["lr"], momentum=p["momentum"],
                                                       weight_decay=p["weight_decay"])
    else:
        optim = torch.optim.AdamW(groups, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                                  weight_decay=p["weight_decay"])
    losses, norms = [], []
    for step in range(steps):
        optim.zero_grad()
        batch = global_batch(kind, step, num_micro * MICRO)
        step_losses = []
        for j in range(num_micro):
            loss = loss_of(kind, model, micro_batch(batch, j))
            (loss / num_micro).backward()
            step_losses.append(loss.item())
        losses.append(step_losses)
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), clip if clip > 0 else float("inf")).item())
        optim.step()
    return {"losses": losses, "norms": norms, "state": copy.deepcopy(model.state_dict())}


def ds_config(dp: int, ga: int, stage: int, kind: str = "mlp", **extra) -> dict:
    """A DeepSpeed config for the test models (fp32 unless ``extra`` says otherwise)."""
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ga,
        "train_batch_size": MICRO * ga * dp,
        "optimizer": opt_for(kind),
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700},
        "steps_per_print": 10**6,
    }
    config.update(extra)
    return config


def run_steps(kind: str, engine, start: int, stop: int) -> tuple[list, list]:
    """Steps ``start..stop-1`` of the test's data through ``engine``; per-micro-step losses and norms."""
    dp, ga = engine.parallel_state.dp_size, engine.gradient_accumulation_steps()
    losses, norms = [], []
    for step in range(start, stop):
        batch = global_batch(kind, step, dp * ga * MICRO)
        step_losses = []
        for k in range(ga):
            loss = loss_of(kind, engine, micro_batch(batch, k * dp + engine.parallel_state.dp_rank))
            engine.backward(loss)
            engine.step()
            step_losses.append(loss.item())
        losses.append(step_losses)
        norms.append(engine.get_global_grad_norm())
    return losses, norms


def state_of(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def train_engine(kind: str, config: dict, steps: int, model: torch.nn.Module | None = None) -> dict:
    """Train through ``megatron_core.initialize`` on this rank; per-micro-step losses, norms, final state."""
    import megatron_core

    engine, _, _, _ = megatron_core.initialize(model if model is not None else make_model(kind), config=config)
    engine.train()
    losses, norms = run_steps(kind, engine, 0, steps)
    engine.parallel_state.destroy()
    return {
        "losses": losses,
        "norms": norms,
        "state": state_of(engine),
        "dp": (engine.parallel_state.dp_rank, engine.parallel_state.dp_size),
        "global_steps": engine.global_steps,
        "micro_steps": engine.micro_steps,
    }


def sharded(config: dict) -> dict:
    """Under ZeRO-3 shard every bucket (DeepSpeed's default persistence threshold keeps these tiny models'
    buckets resident, and a save then needs no gather: the hang of a DP-rank-0-only gather went unseen)."""
    if config["zero_optimization"]["stage"] == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


BASE_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}},
}
"""A DeepSpeed config of the config tests (no model behind it): the batch pair and an AdamW section."""


def config_with(**changes) -> dict:
    """A deep copy of :data:`BASE_CONFIG` with ``changes`` set at its top level."""
    config = copy.deepcopy(BASE_CONFIG)
    config.update(changes)
    return config


def config_error(call: Callable[[], Any]) -> str | None:
    """The one line of the ConfigError ``call()`` raises, or None when it returns (its result is dropped)."""
    try:
        call()
    except ConfigError as exc:
        return str(exc)
    return None
