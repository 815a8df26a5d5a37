"""What ``initialize`` accepts besides the config: a client optimizer, ``model_parameters``, a client scheduler.

The engine has one optimizer implementation (``get_megatron_optimizer``: fp32 main parameters, loss
scaling, clipping, ZeRO-1/2). A torch optimizer the user built is therefore read, not used: its class
and hyper-parameters become the ``OptimizerConfig`` fields, and anything the library optimizer
would not reproduce is a ConfigError rather than a silent change.
"""

from __future__ import annotations

import dataclasses
import warnings
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
    if any(g.get("maximize") for g in groups):  # the library optimizer minimizes: it was dropped silently
        raise ConfigError("initialize(optimizer=...): maximize=True is not implemented (the engine minimizes the "
                          "loss); drop it and pass the negated objective to engine.backward")
    decay = max(float(g.get("weight_decay", 0.0)) for g in groups)  # each group keeps its own: param_groups_of
    name = type(optimizer).__name__
    # torch's Adam(decoupled_weight_decay=True) is AdamW (torch >= 2.6; AdamW subclasses Adam with it set)
    adam = isinstance(optimizer, torch.optim.Adam)
    if isinstance(optimizer, torch.optim.AdamW) or (adam and (decay == 0.0 or first.get("decoupled_weight_decay"))):
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


def share_param_groups(client: torch.optim.Optimizer, groups: list[dict]) -> None:
    """Make the client optimizer's ``param_groups`` the library optimizer's ``groups`` (one per client group, in
    order), as DeepSpeed 0.19.8's ZeRO optimizers rewrite the client's groups in place and its ZeRO-0 steps the
    client itself: a scheduler built on the client optimizer (``LambdaLR(opt, ...)``, Hugging Face Trainer's) and
    a loop setting ``opt.param_groups[i]["lr"]`` then drive the training instead of an optimizer nothing steps.
    Keys a scheduler put in the client's groups (``initial_lr``, OneCycleLR's ``max_lr``, ...) are carried over;
    the library's own keys stay."""
    for mine, theirs in zip(groups, client.param_groups, strict=True):
        for key, value in theirs.items():
            mine.setdefault(key, value)
    client.param_groups = groups


def step_scheduler(scheduler: Any, lr_kwargs: dict | None) -> None:
    """``scheduler.step(**lr_kwargs)`` after the library optimizer's step, without torch's warning that it was
    called before ``optimizer.step()``: torch checks the client optimizer the scheduler was built on, whose
    ``step`` the engine never calls (its groups were stepped: :func:`share_param_groups`), so the warning and its
    "skipping the first value of the learning rate schedule" would be false."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer")
        scheduler.step(**(lr_kwargs or {}))


def check_covers_model(params: Iterable[Any], model: torch.nn.Module, what: str) -> None:
    """Raise unless ``params`` are ``model``'s trainable parameters (freeze others with requires_grad).

    The model's frozen parameters may be among them (``model.parameters()`` on a partly frozen model): they
    are left out, as DeepSpeed 0.19.8 trains them (torch.optim skips a parameter without a gradient, ZeRO
    drops ``requires_grad=False`` ones)."""
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    given = {id(p) for p in params} - frozen
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if given != trainable:
        raise ConfigError(
            f"{what} covers {len(given & trainable)} of the model's {len(trainable)} trainable parameters "
            f"(and {len(given - trainable)} tensors that are not the model's): the engine trains every parameter "
            f"with requires_grad=True; freeze the rest with requires_grad_(False)"
        )


def _given_groups(model_parameters: Any) -> list[dict]:
    """``model_parameters`` as torch-style groups (a plain list of tensors is one group, as torch and DeepSpeed
    read it). Per-group options other than ``weight_decay`` are refused."""
    items = list(model_parameters)
    if not any(isinstance(item, dict) for item in items):
        return [{"params": [_tensor_of(p) for p in items]}]
    groups = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError("initialize(model_parameters=...): mixes param-group dicts and tensors; give one kind")
        extra = set(item) - {"params", "weight_decay"}
        if extra:
            raise ConfigError(
                f"initialize(model_parameters=...): per-group option(s) {sorted(extra)} are not "
                f"supported; set them in the config's 'optimizer' section"
            )
        decay = item.get("weight_decay", 0.0)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0.0:
            raise ConfigError(f"initialize(model_parameters=...): group {index}'s weight_decay must be a number >= 0, "
                              f"got {decay!r}")
        params = item["params"]  # one tensor is a group of one, as torch.optim reads it (not its rows)
        groups.append({**item, "params": [_tensor_of(p) for p in ([params] if torch.is_tensor(params) else params)]})
    _check_disjoint(groups)
    return groups


def _check_disjoint(groups: list[dict]) -> None:
    """A parameter in two groups is torch.optim's (and so DeepSpeed 0.19.8's) ValueError 'some parameters appear
    in more than one parameter group'; the engine took it silently."""
    seen: dict[int, int] = {}
    for index, group in enumerate(groups):
        for param in group["params"]:
            if id(param) in seen:
                raise ConfigError(f"initialize(model_parameters=...): a parameter of shape {tuple(param.shape)} is in "
                                  f"groups {seen[id(param)]} and {index}; give each parameter to one group")
            seen[id(param)] = index


def check_model_parameters(model_parameters: Any, model: torch.nn.Module) -> None:
    """``model_parameters`` (tensors or param-group dicts) must list the trainable parameters, nothing else."""
    if model_parameters is None:
        return
    params = [p for group in _given_groups(model_parameters) for p in group["params"]]
    check_covers_model(params, model, "initialize(model_parameters=...)")


def param_groups_of(model_parameters: Any, optimizer: Any, model: torch.nn.Module,
                    weight_decay: float) -> list[tuple[list[str], float]]:
    """The optimizer's param groups as DeepSpeed forms them, by parameter name: ``[(names, weight_decay)]``.

    DeepSpeed 0.19 steps the client optimizer's groups, else builds the config's optimizer over
    ``model_parameters`` (``module.parameters()`` when None): a plain list is one group, decayed by the
    optimizer's ``weight_decay`` (biases and norm weights too); a group dict's own ``weight_decay``
    wins. Names (not tensors) because AutoTP replaces the layers, keeping their parameter names.
    Frozen parameters are left out (they never get a gradient).
    """
    if optimizer is not None:
        groups = [{"params": g["params"], "weight_decay": g.get("weight_decay", 0.0)} for g in optimizer.param_groups]
    elif model_parameters is not None:
        groups = _given_groups(model_parameters)
    else:
        groups = [{"params": list(model.parameters())}]
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [([name_of[id(p)] for p in g["params"] if p.requires_grad], float(g.get("weight_decay", weight_decay)))
            for g in groups]


def model_param_groups(groups: list[tuple[list[str], float]], model: torch.nn.Module) -> list[dict]:
    """:func:`param_groups_of`'s groups over ``model``'s parameters now (after the AutoTP swap), in the form
    ``get_megatron_optimizer(model_param_groups=...)`` takes."""
    params = dict(model.named_parameters())
    return [{"params": [params[name] for name in names], "weight_decay": decay} for names, decay in groups]


def _tensor_of(item: Any) -> Any:
    """A parameter given as itself or as ``named_parameters()``' ``(name, tensor)`` pair (torch >= 2.6 optimizers
    and DeepSpeed take both)."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[1]
    return item
