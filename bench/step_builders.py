"""Training-step builders shared by ``bench_gpu.py`` (one GPU, bf16) and ``bench_peers.py`` (CPU layouts, fp32).

``ours_step`` and ``mcore_step`` build a GPT-2-style model of a :class:`GPTShape` under a :class:`Layout`
in this process (its ``torch.distributed`` group must be up), take this data-parallel rank's share of the
global batch ``(inputs, labels)`` [batch, seq] in ``layout.micro`` microbatches, and return a closure
running one training step: forward and backward of every microbatch through the system's own schedule,
then its optimizer step. The closure returns the mean loss of the step's microbatches (a float: it waits
for the step), or None on a pipeline stage without the loss.

``ours``: GPTModel, DDP (``zero_stage``), optimizer and schedule as pretrain_gpt builds them.
``mcore``: megatron-core 0.16.1's GPTModel (local spec), DDP (its distributed optimizer is ZeRO stage 1),
optimizer and schedule; with ``bf16`` wrapped in Float16Module as Megatron-LM's ``get_model`` does. Both
use Adam at lr 1e-4 and seed 1234. megatron-core runs on a CPU through :func:`patch_megatron_for_cpu`.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), each [batch, seq] token ids
Step = Callable[[], float | None]


@dataclass(frozen=True)
class GPTShape:
    """The benchmarked model: GPT-2 architecture (learned positions, tied embeddings, 4h MLP)."""

    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    dropout: float


@dataclass(frozen=True)
class Layout:
    """Tensor- and pipeline-parallel sizes, ZeRO stage and microbatches per step (DP is what is left)."""

    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro: int = 1


def rank_microbatches(batch: Batch, dp_size: int, dp_rank: int, micro: int) -> list[Batch]:
    """This DP rank's consecutive rows of the global batch, cut into ``micro`` microbatches."""
    inputs, labels = batch
    per_rank = inputs.shape[0] // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    x, y = inputs[rows], labels[rows]
    mbs = per_rank // micro
    return [(x[i * mbs:(i + 1) * mbs], y[i * mbs:(i + 1) * mbs]) for i in range(micro)]


def _mean_loss(losses: Sequence[dict[str, torch.Tensor]] | Any) -> float | None:
    if not losses:  # a pipeline stage other than the last
        return None
    return float(sum(d["lm loss"] for d in losses) / len(losses))


def _loss(out: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = out.float().mean()
    return loss, {"lm loss": loss.detach()}


def ours_step(shape: GPTShape, layout: Layout, batch: Batch, *, bf16: bool = False,
              attention_backend: str = "auto") -> Step:
    """Our training step (see the module docstring); ``bf16``: bf16 parameters, fp32 gradient reduction."""
    from megatron_core import device, parallel_state
    from megatron_core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
        no_sync_func,
    )
    from megatron_core.models.gpt import build_gpt_model_chunks
    from megatron_core.models.presets import gpt2_config
    from megatron_core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron_core.pipeline_parallel import get_forward_backward_func
    dev = device.set_local_device(int(os.environ.get("LOCAL_RANK", "0")))  # as pretrain_gpt's initialize does
    ps = parallel_state.initialize_model_parallel(layout.tp, layout.pp)
    ps.manual_seed(1234)
    config = gpt2_config(shape.layers, shape.hidden, shape.heads, hidden_dropout=shape.dropout,
                         attention_dropout=shape.dropout, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                         attention_backend=attention_backend)
    config.validate_parallel(layout.tp, layout.pp)
    chunks = build_gpt_model_chunks(config, shape.vocab, shape.seq, parallel_state=ps)
    ddp_config = DistributedDataParallelConfig(zero_stage=layout.zero, grad_reduce_in_fp32=bf16)
    wrapped: list[torch.nn.Module] = [DistributedDataParallel(ddp_config, c.to(dev), ps) for c in chunks]
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-4, bf16=bf16), wrapped, ps)
    schedule = get_forward_backward_func(ps)
    batches = rank_microbatches(batch, ps.dp_size, ps.dp_rank, layout.micro)

    def forward_step(data_iterator, model):
        x, y = next(data_iterator)
        return model(x, labels=y), _loss

    def step() -> float | None:
        optimizer.zero_grad()
        losses = schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=wrapped,
                          num_microbatches=layout.micro, seq_length=shape.seq, micro_batch_size=len(batches[0][0]),
                          no_sync_func=no_sync_func(wrapped),
                          finalize_model_grads_func=functools.partial(finalize_model_grads, parallel_state=ps))
        optimizer.step()
        return _mean_loss(losses)
    return step


def _mcore_config(shape: GPTShape, layout: Layout, bf16: bool, fused: bool, on_cpu: bool):
    from megatron.core.transformer import TransformerConfig
    dtype = torch.bfloat16 if bf16 else torch.float32
    # fused: Megatron-LM's GPT defaults, bias-GeLU (its tanh form, so F.gelu is named) and bias-dropout-add
    # (torch.compile'd); no apex/TE here, so no fused softmax and no fused weight-gradient accumulation.
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        ffn_hidden_size=4 * shape.hidden, hidden_dropout=shape.dropout, attention_dropout=shape.dropout,
        activation_func=F.gelu if fused else _gelu_tanh, layernorm_epsilon=1e-5, bf16=bf16, params_dtype=dtype,
        pipeline_dtype=dtype, tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        use_cpu_initialization=on_cpu, bias_activation_fusion=fused, masked_softmax_fusion=False,
        bias_dropout_fusion=fused, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, batch_p2p_comm=False)


def mcore_step(shape: GPTShape, layout: Layout, batch: Batch, *, bf16: bool = False, fused: bool = False) -> Step:
    """megatron-core's training step (see the module docstring); ``fused``: its bias-GeLU and
    bias-dropout-add fusions (Megatron-LM's defaults; off for the CPU peers' comparison)."""
    from megatron_core import device
    on_cpu = not device.cuda_available()
    dev = torch.device("cpu") if on_cpu else device.set_local_device(int(os.environ.get("LOCAL_RANK", "0")))
    if on_cpu:
        patch_megatron_for_cpu()
    from megatron.core import parallel_state as mps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module
    mps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp)
    model_parallel_cuda_manual_seed(1234)
    config = _mcore_config(shape, layout, bf16, fused, on_cpu)
    model = GPTModel(config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=shape.vocab,
                     max_sequence_length=shape.seq, pre_process=mps.is_pipeline_first_stage(),
                     post_process=mps.is_pipeline_last_stage(), share_embeddings_and_output_weights=True,
                     position_embedding_type="learned_absolute").to(dev)
    if bf16:
        model = Float16Module(config, model)  # as Megatron-LM's get_model: every weight bf16 (the norms too)
    distributed = layout.zero == 1
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=bf16, use_distributed_optimizer=distributed), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=bf16,
                                                       params_dtype=config.params_dtype,
                                                       use_distributed_optimizer=distributed), [ddp])
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    batches = rank_microbatches(batch, mps.get_data_parallel_world_size(), mps.get_data_parallel_rank(),
                                layout.micro)
    mbs = len(batches[0][0])
    positions = torch.arange(shape.seq, device=dev).expand(mbs, shape.seq)

    def forward_step(data_iterator, model):
        tokens, target = next(data_iterator)
        return model(tokens, positions, None, labels=target), _loss

    schedule = get_forward_backward_func()

    def step() -> float | None:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
                          num_microbatches=layout.micro, seq_length=shape.seq, micro_batch_size=mbs,
                          forward_only=False)
        optimizer.step()
        return _mean_loss(losses)
    return step


def hf_gpt2(shape: GPTShape):
    """Hugging Face's GPT2LMHeadModel of ``shape`` (fp32, training mode, SDPA attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=shape.vocab, n_positions=shape.seq, n_embd=shape.hidden, n_layer=shape.layers,
                        n_head=shape.heads, resid_pdrop=shape.dropout, embd_pdrop=shape.dropout,
                        attn_pdrop=shape.dropout, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).float().train()


# --- megatron-core on a CPU ------------------------------------------------------------------------

def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _on_cpu(factory):
    def wrapped(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return wrapped


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in parameters if isinstance(parameters, (list, tuple)) else [parameters]:
            grad = p.decoupled_grad if use_decoupled_grad else p.grad
            if grad is not None:
                grad.mul_(coeff)


def _cuda_type_name(original):
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)
    return type_


@functools.cache
def patch_megatron_for_cpu() -> None:
    """Let megatron-core 0.16.1 train on a CPU, in this process only (once).

    Its CUDA RNG tracker reads and writes the CPU generator (``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state``, ``torch.cuda.get_rng_state`` / ``manual_seed``); ``torch.cuda.current_device``
    answers ``"cpu"`` (its layers and gradient buffers allocate on it); ``device="cuda"`` in
    ``torch.tensor/zeros/ones/empty/full`` and ``Tensor.cuda()`` map to the CPU (optimizer, grad-norm and
    schedule scalars); ``Tensor.type()`` names CPU tensors ``torch.cuda.*Tensor`` (its optimizers sort
    parameters by it); its gradient clipping (which asserts CUDA grads) is replaced by the same scaling.
    Its tracker warns on every fork that the CPU RNG moved (which here it must); that logger is silenced.
    """
    import megatron.core.optimizer.optimizer as moptimizer
    import megatron.core.tensor_parallel.random as mrandom
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.get_rng_state = torch.get_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.current_device = lambda: "cpu"
    for name in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _cuda_type_name(torch.Tensor.type)
    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
