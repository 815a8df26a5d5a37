"""What ``initialize`` accepts besides the config: a client optimizer, ``model_parameters``, a client scheduler.

The engine has one optimizer implementation (``get_megatron_optimizer``: fp32 main parameters, loss
scaling, clipping, ZeRO-1/2). A torch optimizer the user built is therefore read, not used: its class
and hyper-parameters become the ``OptimizerConfig`` fields, and anything the library optimizer
would not reproduce is a ConfigError rather than a silent change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from megatron_core.errors import ConfigError
from megatron_core.optimizer import OptimizerConfig


def optimizer_config_from_client(
    optimizer: torch.optim.Optimizer, base: OptimizerConfig, model: torch.nn.Module
) -> OptimizerConfig:
    """``base`` (precision and clipping from the config) with the client optimizer's type and hyper-parameters.

    Accepts ``torch.optim.AdamW``, ``Adam`` without weight decay (then identical to AdamW) and ``SGD``
    (no nesterov / dampening), one set of hyper-parameters over exactly the model's trainable parameters.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"initialize(optimizer=...) must be a torch.optim.Optimizer (Adam, AdamW or SGD) or None "
            f"with an 'optimizer' section in the config, got {type(optimizer).__name__}"
        )
    groups = optimizer.param_groups
    check_covers_model((p for g in groups for p in g["params"]), model, "initialize(optimizer=...)")
    first = groups[0]
    hyper = ("lr", "betas", "eps", "momentum", "dampening", "nesterov")
    for group in groups[1:]:
        for name in hyper:
            if group.get(name) != first.get(name):
                raise ConfigError(
                    f"initialize(optimizer=...): param groups differ in {name!r}; the engine uses one "
                    f"set of hyper-parameters: put them in the config's 'optimizer' section"
                )
    decay = max(float(g.get("weight_decay", 0.0)) for g in groups)
    check_group_decays((g.get("weight_decay", 0.0) for g in groups), decay, "initialize(optimizer=...)")
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.AdamW) or (isinstance(optimizer, torch.optim.Adam) and decay == 0.0):
        if first.get("amsgrad"):
            raise ConfigError("initialize(optimizer=...): amsgrad=True is not implemented; use amsgrad=False")
        return dataclasses.replace(
            base,
            optimizer="adam",
            lr=float(first["lr"]),
            adam_beta1=float(first["betas"][0]),
            adam_beta2=float(first["betas"][1]),
            adam_eps=float(first["eps"]),
            weight_decay=decay,
        )
    if isinstance(optimizer, torch.optim.SGD):
        if first.get("nesterov") or first.get("dampening", 0.0):
            raise ConfigError("initialize(optimizer=...): SGD with nesterov or dampening is not implemented")
        return dataclasses.replace(
            base, optimizer="sgd", lr=float(first["lr"]), sgd_momentum=float(first["momentum"]), weight_decay=decay
        )
    hint = (
        " (Adam with weight_decay > 0 is L2-coupled Adam: use AdamW)" if isinstance(optimizer, torch.optim.Adam) else ""
    )
    raise ConfigError(f"initialize(optimizer=...): {name} is not implemented; use torch.optim.AdamW or SGD{hint}")


def check_group_decays(decays: Iterable[Any], optimizer_decay: float, what: str) -> None:
    """Raise for a param group's ``weight_decay`` other than 0 and ``optimizer_decay``.

    The library optimizer decays every matrix by one value and no 1-D parameter; DeepSpeed (a torch
    optimizer) would apply each group's own value, so a third value would silently change the training.
    """
    for decay in decays:
        if float(decay) not in (0.0, float(optimizer_decay)):
            raise ConfigError(
                f"{what}: a param group's weight_decay {float(decay):g} is neither 0 nor the optimizer's "
                f"{float(optimizer_decay):g}; the engine decays every matrix by the optimizer's value and no "
                f"bias or norm weight: give the groups that value or 0 (or one group)"
            )


def check_covers_model(params: Iterable[Any], model: torch.nn.Module, what: str) -> None:
    """Raise unless ``params`` are exactly ``model``'s trainable parameters (freeze others with requires_grad)."""
    given = {id(p) for p in params}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if given != trainable:
        raise ConfigError(
            f"{what} covers {len(given & trainable)} of the model's {len(trainable)} trainable parameters "
            f"(and {len(given - trainable)} others): the engine trains every parameter with "
            f"requires_grad=True; freeze the rest with requires_grad_(False)"
        )


def check_model_parameters(model_parameters: Any, model: torch.nn.Module, weight_decay: float) -> None:
    """``model_parameters`` (tensors or param-group dicts) must list the trainable parameters, nothing else.

    Per-group options other than Hugging Face's usual ``weight_decay`` split (none on biases and
    norm weights, which is the library's rule; a group's nonzero value must be the optimizer's
    ``weight_decay``) are refused.
    """
    if model_parameters is None:
        return
    items = list(model_parameters)
    params: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            extra = set(item) - {"params", "weight_decay"}
            if extra:
                raise ConfigError(
                    f"initialize(model_parameters=...): per-group option(s) {sorted(extra)} are not "
                    f"supported; set them in the config's 'optimizer' section"
                )
            group = [_tensor_of(p) for p in item["params"]]
            check_group_decays([item.get("weight_decay", 0.0)], weight_decay, "initialize(model_parameters=...)")
            if item.get("weight_decay", None) == 0.0 and any(p.dim() > 1 for p in group):
                raise ConfigError(
                    "initialize(model_parameters=...): a group without weight decay holds matrices; the "
                    "engine exempts exactly the 1-D parameters (biases, norm weights) from weight decay"
                )
            params.extend(group)
        else:
            params.append(_tensor_of(item))
    check_covers_model(params, model, "initialize(model_parameters=...)")


def _tensor_of(item: Any) -> Any:
    """A parameter given as itself or as ``named_parameters()``' ``(name, tensor)`` pair (torch >= 2.6 optimizers
    and DeepSpeed take both)."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[1]
    return item
