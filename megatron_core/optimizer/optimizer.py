"""The optimizer step shared by all variants, and the replicated (ZeRO-0) optimizer.

A step: gather the gradients into fp32 main gradients, unscale them and agree on inf/nan over
every rank (fp16), clip by the global norm, update the fp32 main parameters with a torch
optimizer, copy them back into the (bf16/fp16) model parameters. The variants differ only in
what a "main parameter" is: the whole parameter here, a DP shard of it in ``distrib_optimizer``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from megatron_core.optimizer.clip_grads import (
    agree_found_inf,
    any_non_finite,
    clip_by_total_norm,
    count_zeros,
    counted_in_norm,
    global_l2_norm,
)
from megatron_core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron_core.optimizer.optimizer_config import OptimizerConfig
from megatron_core.parallel_state import ParallelState

# (main parameter the torch optimizer updates, model parameter it belongs to)
ParamPair = tuple[torch.nn.Parameter, torch.nn.Parameter]


def make_grad_scaler(config: OptimizerConfig) -> ConstantGradScaler | None:
    """The loss scaler for fp16 (static with ``loss_scale``, else dynamic); None for bf16 / fp32."""
    if not config.fp16:
        return None
    if config.loss_scale is not None:
        return ConstantGradScaler(config.loss_scale)
    return DynamicGradScaler(config.initial_loss_scale, config.min_loss_scale, config.loss_scale_window,
                             config.hysteresis, consecutive_hysteresis=config.consecutive_hysteresis,
                             deepspeed_window=config.deepspeed_loss_scale_window)


def _fused_adam_applies(params: Sequence[torch.Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def is_embedding_or_output_parameter(param: torch.Tensor) -> bool:
    """Whether the model tagged ``param`` as the input word embedding or the output layer weight
    (Megatron-LM's ``is_embedding_or_output_parameter``, set by ``GPTModel`` as megatron.core's
    ``LanguageModule.setup_embeddings_and_output_layer`` does)."""
    return bool(getattr(param, "is_embedding_or_output_parameter", False))


def group_index(ndim: int, embedding_or_output: bool, decoupled_lr: bool) -> int:
    """Megatron-LM's torch optimizer group of a parameter of ``ndim`` dimensions: 0 weight decay, 1 no
    weight decay (1-D), 2 the decoupled learning rate (the embedding and output weights, only with
    ``decoupled_lr``). Also what the checkpoint converter reads a saved group layout by."""
    if decoupled_lr and embedding_or_output:
        return 2
    return 0 if ndim > 1 else 1


def param_group_index(model_param: torch.Tensor, config: OptimizerConfig) -> int:
    """:func:`group_index` of a model parameter, its embedding/output tag and ``config.decoupled_lr``."""
    return group_index(model_param.dim(), is_embedding_or_output_parameter(model_param),
                       config.decoupled_lr is not None)


def _megatron_groups(config: OptimizerConfig, pairs: list[ParamPair]) -> list[dict]:
    members: list[list[torch.nn.Parameter]] = [[], [], []]
    for main, model in pairs:
        members[param_group_index(model, config)].append(main)
    groups: list[dict] = [{"params": members[0], "weight_decay": config.weight_decay},
                          {"params": members[1], "weight_decay": 0.0}]
    if config.decoupled_lr is not None:
        groups.append({"params": members[2], "weight_decay": config.weight_decay, "is_decoupled_lr": True,
                       "max_lr": config.decoupled_lr, "min_lr": config.decoupled_min_lr_or_min_lr})
    return groups


def _groups(config: OptimizerConfig, pairs: list[ParamPair], model_param_groups: list[dict] | None) -> list[dict]:
    """The torch param groups over the main parameters: the client's groups, or Megatron-LM's split."""
    if model_param_groups is None:
        return _megatron_groups(config, pairs)
    group_of = {id(p): i for i, group in enumerate(model_param_groups) for p in group["params"]}
    groups: list[dict] = [{"params": [], "weight_decay": float(group["weight_decay"])} for group in model_param_groups]
    for main, model in pairs:
        if id(model) not in group_of:
            raise ValueError(f"model_param_groups leave out a trainable parameter of shape {tuple(model.shape)}; "
                             f"list every parameter with requires_grad=True in one group")
        groups[group_of[id(model)]]["params"].append(main)
    return groups


def build_torch_optimizer(config: OptimizerConfig, pairs: list[ParamPair],
                          model_param_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """Adam (decoupled weight decay, as Megatron-LM's fused Adam) or SGD over the main parameters.

    Without ``model_param_groups``, Megatron-LM's groups (see :func:`param_group_index`): weight decay
    on matrices, none on 1-D parameters (biases and norm weights); with ``config.decoupled_lr`` a third
    group, the embedding and output weights (matrices, so with weight decay), carrying
    ``max_lr``/``min_lr`` that the LR scheduler reads instead of its own and megatron.core's
    ``is_decoupled_lr`` tag. With ``model_param_groups`` (``[{"params": [model parameters],
    "weight_decay": float}, ...]``, the groups a torch optimizer or DeepSpeed's engine is given), one
    torch group per given group, in order, with its weight decay. A main parameter joins its model
    parameter's group, so a ZeRO shard piece of a bias stays where the bias is, and every group
    exists (possibly empty on this rank: the decoupled one on a middle pipeline stage) so every rank
    has the same groups. Raises ValueError when a trainable parameter is in no given group.
    Adam is torch's fused AdamW when every main parameter is a floating-point tensor on CPU or CUDA
    (one multi-threaded kernel over all tensors: 2.3 ms against 6.4-9.5 ms for the per-tensor loop
    that torch picks by default on CPU, 4.3M parameters, 2 threads, bench shape), else its default.
    """
    groups = _groups(config, pairs, model_param_groups)
    if config.optimizer == "adam":
        fused = {"fused": True} if _fused_adam_applies([main for main, _ in pairs]) else {}
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_eps, **fused)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.sgd_momentum)


def model_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The DDP wrapper's ``main_grad`` when present, else ``param.grad``."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


class MegatronOptimizer:
    """Mixed-precision optimizer step around a torch optimizer; subclasses define the main parameters."""

    sharded_over_dp = False

    def __init__(
        self, config: OptimizerConfig, model_chunks: list[torch.nn.Module], parallel_state: ParallelState,
        model_param_groups: list[dict] | None = None,
    ) -> None:
        self.config, self.model_chunks, self.parallel_state = config, list(model_chunks), parallel_state
        self.model_param_groups = model_param_groups  # see build_torch_optimizer
        self.grad_scaler = make_grad_scaler(config)
        self.pairs: list[ParamPair] = []
        self.inner: torch.optim.Optimizer | None = None

    # ---- what subclasses provide --------------------------------------------------------------
    def _prepare_main_grads(self) -> None:
        raise NotImplementedError

    def _copy_main_to_model(self) -> None:
        raise NotImplementedError

    # ---- loss scaling -------------------------------------------------------------------------
    def get_loss_scale(self) -> float:
        """The current loss scale (1.0 without fp16 loss scaling)."""
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale``: the schedules' ``grad_scale_func``."""
        return loss * self.get_loss_scale() if self.grad_scaler is not None else loss

    # ---- the step -----------------------------------------------------------------------------
    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The wrapped torch optimizer over the main parameters (built by the subclass's ``__init__``)."""
        if self.inner is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ did not build its torch optimizer (self.inner)")
        return self.inner

    @property
    def param_groups(self) -> list[dict]:
        """The torch optimizer's groups (the LR scheduler sets ``'lr'`` here)."""
        return self.torch_optimizer.param_groups

    def zero_grad(self) -> None:
        """Zero the DDP gradient buffers (or ``.grad``) of every chunk before a step's first backward."""
        for chunk in self.model_chunks:
            zero_grad_buffer = getattr(chunk, "zero_grad_buffer", None)  # DDP-wrapped chunks only
            if zero_grad_buffer is not None:
                zero_grad_buffer()
            else:
                for p in chunk.parameters():
                    p.grad = None
        self._drop_main_grads()

    def _drop_main_grads(self) -> None:
        for main, _ in self.pairs:
            main.grad = None

    def _main_grads(self) -> list[torch.Tensor]:
        return [main.grad for main, _ in self.pairs if main.grad is not None]

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None, int | None]:
        """One update; returns ``(update_successful, grad_norm, num_zeros)`` (norm before clipping).

        With fp16 an inf/nan on any rank skips the update on every rank and lowers the scale;
        the norm and zero count are then None.
        """
        self._prepare_main_grads()
        grads = self._main_grads()
        if self.grad_scaler is not None:
            inv_scale = 1.0 / self.grad_scaler.scale
            for g in grads:
                g.mul_(inv_scale)
            found_inf = agree_found_inf(any_non_finite(grads), self.parallel_state)
            self.grad_scaler.update(found_inf)
            if found_inf:
                self._drop_main_grads()
                return False, None, None
        counted = [main.grad for main, model in self.pairs
                   if main.grad is not None and counted_in_norm(model, self.parallel_state)]
        grad_norm = global_l2_norm(counted, self.parallel_state, self.sharded_over_dp)
        if self.config.clip_grad > 0:
            clip_by_total_norm(grads, self.config.clip_grad, grad_norm)
        num_zeros = (count_zeros(counted, self.parallel_state, self.sharded_over_dp)
                     if self.config.log_num_zeros_in_grad else None)
        self._update()
        self._drop_main_grads()
        return True, grad_norm, num_zeros

    @torch.no_grad()
    def params_norm(self) -> float:
        """L2 norm of the fp32 main parameters over the whole model, each element counted once as in the
        gradient norm (Megatron-LM's ``calc_params_l2_norm``, ``--log-params-norm``). Collective over the
        model-parallel group (and the DP group when sharded): every rank calls it at the same step."""
        with self.resident():
            counted = [main for main, model in self.pairs if counted_in_norm(model, self.parallel_state)]
            return global_l2_norm(counted, self.parallel_state, self.sharded_over_dp)

    def resident(self) -> contextlib.AbstractContextManager:
        """Context: every main parameter and optimizer state in memory (NVMe offload swaps them in)."""
        return contextlib.nullcontext()

    def _update(self) -> None:
        """The torch optimizer's step on the main parameters, then the copy into the model."""
        self.torch_optimizer.step()
        self._copy_main_to_model()

    # ---- checkpoint pieces shared by the variants --------------------------------------------
    def _common_state(self) -> dict:
        return {"grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None}

    def _load_common_state(self, state: dict) -> None:
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])


class ReplicatedOptimizer(MegatronOptimizer):
    """Every DP rank keeps full fp32 main parameters and optimizer state (plain DP, ZeRO stage 0).

    fp32 model parameters are their own main parameters; bf16/fp16 ones get an fp32 copy.
    """

    def __init__(
        self, config: OptimizerConfig, model_chunks: list[torch.nn.Module], parallel_state: ParallelState,
        model_param_groups: list[dict] | None = None,
    ) -> None:
        super().__init__(config, model_chunks, parallel_state, model_param_groups)
        seen: set[int] = set()
        for chunk in self.model_chunks:
            for p in chunk.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    main = p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float())
                    self.pairs.append((main, p))
        self.inner = build_torch_optimizer(config, self.pairs, model_param_groups)

    def _prepare_main_grads(self) -> None:
        for main, model in self.pairs:
            grad = model_grad(model)
            # .float() is the gradient itself when already fp32: no copy for fp32 / fp32-reduced grads.
            main.grad = None if grad is None else grad.float()

    def _copy_main_to_model(self) -> None:
        for main, model in self.pairs:
            if main is not model:
                model.data.copy_(main)

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Make the fp32 main copies follow model weights loaded without optimizer state."""
        for main, model in self.pairs:
            if main is not model:
                main.copy_(model)

    def state_dict(self) -> dict:
        """Loss-scaler state, the torch optimizer's state dict and the fp32 main copies of fp16/bf16 params."""
        state = self._common_state()
        state["optimizer"] = self.torch_optimizer.state_dict()
        state["fp32_from_fp16_params"] = [main.detach().clone() for main, model in self.pairs if main is not model]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; ValueError when the fp32 main copies do not match the model."""
        self._load_common_state(state)
        self.torch_optimizer.load_state_dict(state["optimizer"])
        copies = [main for main, model in self.pairs if main is not model]
        saved = state.get("fp32_from_fp16_params", [])
        if len(saved) != len(copies):
            raise ValueError(f"optimizer checkpoint has {len(saved)} fp32 main parameters, the model needs "
                             f"{len(copies)}: was it saved with the same --fp16/--bf16 setting and model?")
        with torch.no_grad():
            for main, value in zip(copies, saved, strict=True):
                main.copy_(value)
