"""Training steps of the peers for ``bench_peers.py``: megatron-core 0.16.1 and DeepSpeed 0.19.8.

Imported only inside the peers' venv (``python bench/bench_peers.py --make-venv PATH``), in a
worker process whose ``torch.distributed`` gloo group is already up. Each ``STEPS[name](layout,
layout_row, batch_fn, shape)`` returns a closure running one training step on the bench's batch.

megatron-core on CPU needs, in this process only: its CUDA RNG tracker reading and writing the CPU
generator (``_get_cuda_rng_state`` / ``_set_cuda_rng_state``, ``torch.cuda.get_rng_state`` /
``manual_seed``), ``torch.cuda.current_device`` answering ``"cpu"`` (its layers and gradient
buffers allocate on it), ``device="cuda"`` in ``torch.tensor/zeros/ones/empty/full`` and
``Tensor.cuda()`` mapped to the CPU (optimizer, grad-norm and schedule scalars), ``Tensor.type()``
naming CPU tensors as ``torch.cuda.*Tensor`` (its optimizers sort parameters by it), its gradient
clipping (which asserts CUDA grads) replaced by the same scaling, CPU initialisation, and its
fusions and batched p2p switched off. Its tracker warns on every fork that the CPU RNG moved
(which here it must); that logger is silenced. Both peers clip at 1.0, as ours does.
DeepSpeed wraps the same Hugging Face GPT-2 the HF row uses, with torch's AdamW as its optimizer
(``zero_allow_untested_optimizer``: its fused Adam needs CUDA).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F


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


def _patch_megatron_for_cpu() -> None:
    import megatron.core.tensor_parallel.random as mrandom
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.get_rng_state = torch.get_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.current_device = lambda: "cpu"
    # Optimizer, grad-scaler, clip-grad and schedule code allocate scalars with device="cuda".
    for name in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # The optimizers sort parameters by ``param.type()`` against 'torch.cuda.FloatTensor' etc.
    torch.Tensor.type = _cuda_type_name(torch.Tensor.type)
    # Its clipping asserts torch.cuda.FloatTensor grads; the same scaling by max_norm / (norm + 1e-6).
    import megatron.core.optimizer.optimizer as moptimizer
    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def mcore_step(layout: str, row: tuple, batch_fn, shape: dict):
    """megatron-core's GPTModel (local spec), DDP / distributed optimizer and schedule, on CPU."""
    _patch_megatron_for_cpu()
    from megatron.core import parallel_state as mps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    _, _, tp, pp, zero, micro = row[:6]
    mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        ffn_hidden_size=4 * shape["hidden"], hidden_dropout=shape["dropout"], attention_dropout=shape["dropout"],
        activation_func=_gelu_tanh, layernorm_epsilon=1e-5, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False, batch_p2p_comm=False)
    model = GPTModel(config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=shape["vocab"],
                     max_sequence_length=shape["seq"], pre_process=mps.is_pipeline_first_stage(),
                     post_process=mps.is_pipeline_last_stage(), share_embeddings_and_output_weights=True,
                     position_embedding_type="learned_absolute")
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=zero == 1), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, use_distributed_optimizer=zero == 1),
                                       [ddp])
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    inputs, labels = batch_fn()
    dp, dp_rank = mps.get_data_parallel_world_size(), mps.get_data_parallel_rank()
    per_rank = shape["batch"] // dp
    x, y = inputs[dp_rank * per_rank:(dp_rank + 1) * per_rank], labels[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    mbs = per_rank // micro
    batches = [(x[i * mbs:(i + 1) * mbs], y[i * mbs:(i + 1) * mbs]) for i in range(micro)]
    positions = torch.arange(shape["seq"]).expand(mbs, shape["seq"])

    def forward_step(data_iterator, model):
        tokens, target = next(data_iterator)
        out = model(tokens, positions, None, labels=target)
        return out, lambda o: (o.mean(), {"lm loss": o.mean().detach()})

    schedule = get_forward_backward_func()

    def step() -> None:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp], num_microbatches=micro,
                 seq_length=shape["seq"], micro_batch_size=mbs, forward_only=False)
        optimizer.step()
    return step


def deepspeed_step(layout: str, row: tuple, batch_fn, shape: dict):
    """DeepSpeed's engine (ZeRO stage of the layout) around Hugging Face's GPT-2, on CPU."""
    import deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel
    _, _, _, _, zero, _ = row[:6]
    config = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["seq"], n_embd=shape["hidden"],
                        n_layer=shape["layers"], n_head=shape["heads"], resid_pdrop=shape["dropout"],
                        embd_pdrop=shape["dropout"], attn_pdrop=shape["dropout"], bos_token_id=0, eos_token_id=0,
                        attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).float().train()
    world = torch.distributed.get_world_size()
    ds_config = {"train_batch_size": shape["batch"], "train_micro_batch_size_per_gpu": shape["batch"] // world,
                 "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,
                 "gradient_clipping": 1.0, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                           config=ds_config, dist_init_required=False)
    inputs, _ = batch_fn()
    per_rank = shape["batch"] // world
    rank = torch.distributed.get_rank()
    mine = inputs[rank * per_rank:(rank + 1) * per_rank]

    def step() -> None:
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
    return step


STEPS = {"mcore": mcore_step, "deepspeed": deepspeed_step}
