"""ZeRO-3 ``state_dict()`` / ``load_state_dict()`` of a DDP-wrapped module without gathering the whole model.

Under ZeRO-3 a rank keeps only its shard of every bucket (``ParamAndGradBuffer.param_shard``); the parameters
of a freed bucket are views of a storage resized to 0. A checkpoint still holds full (TP-local) parameters.

- Save (:func:`copy_state_dict`, a state_dict post-hook): each parameter's entry becomes a copy of its full
  value, gathered one bucket at a time: one copy of the model (the state dict) plus a bucket. The hook is on
  every submodule and acts once, at the root of the call (the module ``state_dict()`` was called on, with any
  ``prefix``, also when reached through a container), so ``model.body.state_dict()`` copies the body's
  parameters and a whole-model call gathers each bucket once.
- Load (:func:`load_into_shards`, a load_state_dict pre-hook on every submodule, which torch runs before the
  module's own parameters are copied): each rank copies from the incoming full tensors the elements of its own
  shard straight into ``param_shard``, with no collective and nothing gathered (gathering every bucket first
  held a second copy of the model beside the incoming one). The entry is then replaced, in torch's private copy
  of the state dict, by the parameter itself: torch's ``param.copy_(entry)`` returns at once (a tensor copied
  onto itself) instead of writing into freed storage, and its key checks (missing and unexpected keys, under
  ``strict`` or returned) run on the same keys as without ZeRO-3. An entry torch would refuse (not a tensor, or
  another shape) is left to torch, which reports it with its own message and copies nothing. The parameters of
  a bucket gathered at the time (``stage3_param_persistence_threshold``, or held by a running module or a
  ``GatheredParameters`` block) keep their entry, so torch copies into them too and they agree with the shard.
  Frozen parameters are in no bucket (whole on every rank): torch loads them.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from megatron_core.distributed.param_and_grad_buffer import ParamAndGradBuffer
from megatron_core.distributed.param_gather import ParamGatherManager


def register_state_dict_hooks(manager: ParamGatherManager, module: torch.nn.Module, zero3: bool) -> None:
    """The checkpoint hooks of the DDP-wrapped ``module``, on it and every submodule (torch runs each module's
    hooks for its own parameters): :func:`load_into_shards` before a load, and for a ``state_dict()`` call at
    its root a copy of the full parameters (ZeRO-3) or a wait for the gathers in flight
    (``--overlap-param-gather``)."""
    load_hook = functools.partial(load_into_shards, manager, zero3)
    calls = _StateDictCalls(manager, zero3)
    # partials, not bound methods: torch marks a state_dict post-hook with an attribute
    before, after = functools.partial(_StateDictCalls.before, calls), functools.partial(_StateDictCalls.after, calls)
    for submodule in module.modules():
        submodule.register_load_state_dict_pre_hook(load_hook)
        submodule.register_state_dict_pre_hook(before)
        submodule.register_state_dict_post_hook(after)


class _StateDictCalls:
    """The ``state_dict()`` calls in progress over the hooked modules, outermost first, to act once at the
    call's root: the module ``state_dict()`` was called on, whatever its ``prefix`` (``model.body.state_dict(
    prefix="x.")``, or the body reached through a container outside the wrapped model, read freed storage when
    the root was taken to be the wrapped module or a call with ``prefix=""``). torch calls a child as
    ``child.state_dict(prefix=prefix + name + ".")`` between its parent's pre- and post-hooks; a call that does
    not continue the stack that way starts a new one (a call that raised leaves its frames behind)."""

    def __init__(self, manager: ParamGatherManager, zero3: bool) -> None:
        self.manager = manager
        self.zero3 = zero3
        self.stack: list[tuple[torch.nn.Module, str]] = []

    def _nested(self, module: torch.nn.Module, prefix: str) -> bool:
        if not self.stack:
            return False
        parent, parent_prefix = self.stack[-1]
        return any(child is module and prefix == f"{parent_prefix}{name}."
                   for name, child in parent._modules.items())

    def before(self, module: torch.nn.Module, prefix: str, keep_vars: bool) -> None:
        if not self._nested(module, prefix):
            self.stack.clear()
            if not self.zero3:  # --overlap-param-gather: no gather left in flight
                self.manager.gather_all()
        self.stack.append((module, prefix))

    def after(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict) -> None:
        if self.stack and self.stack[-1][0] is module:
            self.stack.pop()
        if not self.stack and self.zero3:  # the call's root: the buffers keep only their shards
            copy_state_dict(self.manager, module, state_dict, prefix)


def copy_state_dict(manager: ParamGatherManager, module: torch.nn.Module, state_dict: dict[str, Any],
                    prefix: str) -> None:
    """ZeRO-3: each bucket parameter's entry of ``state_dict`` becomes a copy of its full value, gathered one
    bucket at a time. Collective over DP: every rank names the same parameters in the same order."""
    entries: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    units = []
    for name, param in module.named_parameters(remove_duplicate=False):
        key = prefix + name
        if key in state_dict and id(param) in manager.unit_of:
            unit = manager.unit_of[id(param)]
            if id(unit[1]) not in entries:
                units.append(unit)
            entries.setdefault(id(unit[1]), []).append((key, param))
    for unit in units:
        frame = [unit]
        manager.pin(frame)
        for key, param in entries[id(unit[1])]:
            state_dict[key] = param.detach().clone()
        manager.unpin(frame)


def _loadable(param: torch.nn.Parameter, value: Any) -> torch.Tensor | None:
    """``value`` as torch's ``_load_from_state_dict`` would copy it into ``param``, or None where torch refuses
    it (not a tensor, another shape) and reports that itself. A 1-element 1-D tensor loads into a 0-D
    parameter (torch's rule for checkpoints of torch 0.3)."""
    if not torch.overrides.is_tensor_like(value):
        return None
    if param.dim() == 0 and value.dim() == 1 and value.shape[0] == 1:
        value = value[0]
    return value if value.shape == param.shape else None


def load_into_shards(manager: ParamGatherManager, zero3: bool, module: torch.nn.Module, state_dict: dict[str, Any],
                     prefix: str, local_metadata: dict, strict: bool, missing_keys: list[str],
                     unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """Load-state-dict pre-hook of ``module`` (see the module docstring): its bucket parameters' entries go
    into this rank's shards; below ZeRO-3 (``--overlap-param-gather``) it only waits for the gathers in flight,
    which would otherwise overwrite the loaded values.

    Raises ValueError (one line) for ``assign=True`` or torch's swap-on-conversion mode under ZeRO-3: either
    would replace the parameters, which must stay views of their buckets."""
    if zero3 and (local_metadata.get("assign_to_params_buffers")
                  or torch.__future__.get_swap_module_params_on_conversion()):
        what = "assign=True" if local_metadata.get("assign_to_params_buffers") else "swap_module_params_on_conversion"
        raise ValueError(f"load_state_dict with {what} would replace the ZeRO-3 parameters of {prefix or 'the model'}"
                         " (views of their buckets); load with assign=False, which copies into this rank's shards")
    for name, param in module._parameters.items():
        if param is None or id(param) not in manager.unit_of:
            continue  # frozen: torch loads it
        buffer, bucket = manager.unit_of[id(param)]
        buffer.wait_param_gather(bucket)
        key = prefix + name
        value = _loadable(param, state_dict[key]) if zero3 and key in state_dict else None
        if value is None:
            continue
        try:
            _copy_into_shard(buffer, param, value)
        except Exception as ex:  # reported as torch reports a failed copy
            if bucket.gathered:
                continue  # torch's own copy fails the same way and says so
            error_msgs.append(f'While copying the parameter named "{key}", whose dimensions in the model are '
                              f"{param.size()} and whose dimensions in the checkpoint are {value.size()}, an "
                              f"exception occurred : {ex.args}.")
        if not bucket.gathered:
            state_dict[key] = param  # torch's copy_ of the parameter onto itself: a no-op, no freed memory read


@torch.no_grad()
def _copy_into_shard(buffer: ParamAndGradBuffer, param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """This rank's elements of ``value`` (``param``'s full value) into its ZeRO-3 shard, converted to its dtype."""
    assert buffer.param_shard is not None
    piece = buffer.local_piece(param)
    # None of it here: an empty copy all the same, so a value that cannot be copied fails on every rank alike.
    start, end, at = (piece.param_start, piece.param_end, piece.shard_start) if piece is not None else (0, 0, 0)
    flat = value.detach().reshape(-1)[start:end]  # a view unless ``value`` is not contiguous
    buffer.param_shard[at:at + end - start].copy_(flat)
