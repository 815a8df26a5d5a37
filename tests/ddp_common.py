"""Shared pieces of the DP / ZeRO / mixed-precision tests (no tests here).

A test model is described by a spec object (``toy_model.ToyConfig``, or the GPT spec in
``test_ddp_gpt``) with ``build_chunks(ps)``, ``serial()``, ``global_parameters(chunks)``,
``microbatches(step, count, micro_batch_size)``, ``forward_step`` and ``loss(model, batch)``. The
reference is a one-process training loop written with plain torch (``torch.optim.AdamW`` or
``SGD``, ``clip_grad_norm_``) on the whole global batch.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    no_sync_func,
)
from megatron_core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron_core.pipeline_parallel import get_forward_backward_func
from megatron_core.tensor_parallel import shard_of_master

MICRO_BATCH = 2
WORD_EMBEDDING = "embedding.word_embeddings.weight"
OPT = dict(lr=0.01, weight_decay=0.1, clip_grad=0.5, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)


def serial_reference(spec: Any, steps: int, num_microbatches: int, opt: dict | None = None,
                     prepare: Callable | None = None) -> dict:
    """Plain torch on one rank: the global batch's microbatches, AdamW (or SGD), clipping by the global norm.

    ``prepare(params by global name)`` may edit the initial weights (applied the same way by :func:`build`).
    """
    opt = {**OPT, **(opt or {})}
    ps = parallel_state.ParallelState(1, 1)
    spec = spec.serial()
    (model,) = spec.build_chunks(ps)
    params = spec.global_parameters([model])
    if prepare is not None:
        prepare(params)
    groups = [{"params": [p for p in params.values() if p.dim() > 1], "weight_decay": opt["weight_decay"]},
              {"params": [p for p in params.values() if p.dim() <= 1], "weight_decay": 0.0}]
    if opt.get("optimizer", "adam") == "sgd":
        optim = torch.optim.SGD(groups, lr=opt["lr"], momentum=opt["sgd_momentum"])
    else:
        # torch's fused AdamW, the implementation the layouts' optimizer uses on CPU and CUDA: the
        # for-loop one rounds differently, which Adam's g / sqrt(v) amplifies on near-zero gradients
        # (measured 1.2e-5 on a bias entry after 5 steps), a difference of implementations, not layouts.
        optim = torch.optim.AdamW(groups, lr=opt["lr"], betas=(opt["adam_beta1"], opt["adam_beta2"]),
                                  eps=opt["adam_eps"], fused=True)
    losses, norms, zeros = [], [], []
    for step in range(steps):
        optim.zero_grad()
        step_losses = []
        for b in spec.microbatches(step, num_microbatches, MICRO_BATCH):
            loss = spec.loss(model, b)
            (loss / num_microbatches).backward()
            step_losses.append(loss.item())
        losses.append(step_losses)
        zeros.append(sum(int((p.grad == 0).sum()) for p in params.values()))
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), opt["clip_grad"]).item())
        optim.step()
    ps.destroy()
    return {"losses": losses, "norms": norms, "zeros": zeros,
            "params": {n: p.detach().clone() for n, p in params.items()}}


def build(layout: dict, spec: Any, ddp: dict, opt: dict | None = None, dtype=torch.float32,
          prepare: Callable | None = None):
    """ParallelState, model chunks, their DDP wrappers and the optimizer for a layout {"tp", "pp", "vpp"}."""
    ps = parallel_state.ParallelState(layout.get("tp", 1), layout.get("pp", 1), layout.get("vpp"))
    chunks = spec.build_chunks(ps)
    if prepare is not None:
        prepare(spec.global_parameters(chunks))
    for chunk in chunks:
        chunk.to(dtype)
    ddp_config = DistributedDataParallelConfig(**ddp)
    wrapped = [DistributedDataParallel(ddp_config, chunk, ps) for chunk in chunks]
    opt = {**OPT, **(opt or {})}
    opt_config = OptimizerConfig(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, **opt)
    optimizer = get_megatron_optimizer(opt_config, wrapped, ps)
    return ps, chunks, wrapped, optimizer


def train_step(parallel_state, spec: Any, wrapped, optimizer, step: int, num_microbatches: int,
               before_step: Callable | None = None) -> tuple:
    """One step on this DP rank's share of the global batch; returns (losses, step() result)."""
    optimizer.zero_grad()
    batches = spec.microbatches(step, num_microbatches * parallel_state.dp_size, MICRO_BATCH)
    mine = batches[parallel_state.dp_rank * num_microbatches:(parallel_state.dp_rank + 1) * num_microbatches]
    iterators = [iter(mine) for _ in wrapped]
    schedule = get_forward_backward_func(parallel_state)
    out = schedule(forward_step_func=spec.forward_step, data_iterator=iterators if len(wrapped) > 1 else iterators[0],
                   model=wrapped, num_microbatches=num_microbatches, seq_length=spec.seq_length,
                   micro_batch_size=MICRO_BATCH, no_sync_func=no_sync_func(wrapped),
                   finalize_model_grads_func=functools.partial(finalize_model_grads, parallel_state=parallel_state),
                   grad_scale_func=optimizer.scale_loss if optimizer.grad_scaler is not None else None)
    if before_step is not None:
        before_step()
    return [d["lm loss"].item() for d in out], optimizer.step()


def train(layout: dict, spec: Any, ddp: dict, steps: int, num_microbatches: int,
          opt: dict | None = None, dtype=torch.float32, prepare: Callable | None = None) -> dict:
    """Train ``steps`` steps; what the comparison with :func:`serial_reference` needs."""
    return train_built(build(layout, spec, ddp, opt, dtype, prepare), spec, steps, num_microbatches)


def train_built(built: tuple, spec: Any, steps: int, num_microbatches: int, before_step: Callable | None = None,
                at_step: Callable[[int], None] | None = None) -> dict:
    """:func:`train` on what :func:`build` returned; ``at_step(step)`` runs before each step's forward,
    ``before_step()`` between its backward and ``optimizer.step()``."""
    ps, chunks, wrapped, optimizer = built
    losses, norms, zeros = [], [], []
    for step in range(steps):
        if at_step is not None:
            at_step(step)
        step_losses, (ok, norm, num_zeros) = train_step(ps, spec, wrapped, optimizer, step, num_microbatches,
                                                        before_step)
        assert ok, f"step {step} was skipped"
        losses.append(step_losses)
        norms.append(norm)
        zeros.append(num_zeros)
    for w in wrapped:
        w.gather_all_params()  # ZeRO-3: full parameters to compare (a no-op below stage 3)
    result = result_of(ps, spec, chunks, losses, norms)
    result["zeros"] = zeros
    ps.destroy()
    return result


def result_of(parallel_state, spec: Any, chunks, losses, norms) -> dict:
    params = spec.global_parameters(chunks)
    return {"losses": losses, "norms": norms, "dp": (parallel_state.dp_rank, parallel_state.dp_size),
            "tp": (parallel_state.tp_rank, parallel_state.tp_size),
            "last_stage": parallel_state.is_pipeline_last_stage(),
            "params": {n: p.detach().float().clone() for n, p in params.items()},
            "shard": {n: ((p.partition_dim, getattr(p, "partition_stride", 1))
                          if getattr(p, "tensor_model_parallel", False) else None) for n, p in params.items()}}


def expected_param(ref: dict, name: str, result: dict) -> torch.Tensor:
    """The serial parameter, cut to this rank's TP shard."""
    full = ref["params"][name]
    shard = result["shard"][name]
    tp_rank, tp_size = result["tp"]
    return full if shard is None else shard_of_master(full, shard[0], shard[1], tp_rank, tp_size)


def compare(results: list, ref: dict, num_microbatches: int, tol: float = 1e-5, what: str = "") -> None:
    """Per-microbatch losses, the global grad norm (and zero count) of every step, the final parameters."""
    from equivalence import assert_rel_close

    seen = set()
    for rank, res in enumerate(results):
        dp_rank, _ = res["dp"]
        for name, value in res["params"].items():
            seen.add(name)
            assert_rel_close(value, expected_param(ref, name, res), tol, f"{what} rank {rank} param {name}")
        assert_rel_close(torch.tensor(res["norms"]), torch.tensor(ref["norms"]), tol, f"{what} rank {rank} grad norms")
        if res.get("zeros") and res["zeros"][0] is not None:
            assert res["zeros"] == ref["zeros"], \
                f"{what} rank {rank}: zero gradient counts {res['zeros']} != {ref['zeros']}"
        if res["last_stage"]:
            mine = [step[dp_rank * num_microbatches:(dp_rank + 1) * num_microbatches] for step in ref["losses"]]
            assert_rel_close(torch.tensor(res["losses"]), torch.tensor(mine), tol, f"{what} rank {rank} losses")
    assert seen == set(ref["params"]), f"{what}: parameters not covered: {set(ref['params']) - seen}"


def gpt_global_parameters(chunks) -> dict:
    """A GPT's parameters by split-independent names: global layer numbers, and the tied output weight of a
    separate last pipeline stage under the word embedding's name."""
    named = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
            if match:
                name = f"decoder.layers.{chunk.decoder.layers[int(match[1])].layer_number}.{match[2]}"
            elif name == "output_layer.weight" and getattr(p, "shared_embedding", False):
                name = WORD_EMBEDDING
            named[name] = p
    return named
