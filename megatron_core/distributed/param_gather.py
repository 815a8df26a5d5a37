"""When bucket parameters are all-gathered and freed: ZeRO-3 on demand, ``--overlap-param-gather``.

Hooks on every submodule of a DDP-wrapped chunk:

- forward pre-hook: the buckets holding the module's own parameters (and any managed Parameter
  passed as an argument, e.g. the tied word embedding handed to the output layer) are waited on,
  all-gathered first if freed. ZeRO-3 then launches the gathers of the next buckets in forward
  order (``stage3_prefetch_bucket_size`` elements) and frees every gathered bucket that neither a
  module still running (the stack of entered modules) nor the prefetch needs.
- forward post-hook (ZeRO-3, grad enabled): a hook on each output tensor re-gathers the module's
  buckets before autograd runs the module's backward. The autograd engine runs nodes in reverse
  creation order, so this hook, made after the module's operations, fires before any of them;
  the next buckets in backward order are prefetched.
- gradient hook (from the DDP wrapper): a bucket is freed once every one of its parameters has
  its gradient for this backward (no node can need it after that).

Forward pre-hooks that fire inside backward (full recompute) gather but never free. Buckets whose
parameters get no gradient stay gathered until the next forward or the optimizer step, which frees
every non-persistent bucket. With ``reshard_after_forward=False`` nothing is freed before the step.
Every DP rank runs the same modules in the same order, so the collectives are issued in the same
order everywhere.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import torch

from megatron_core.distributed.bucket import Bucket
from megatron_core.distributed.param_and_grad_buffer import ParamAndGradBuffer

Unit = tuple[ParamAndGradBuffer, Bucket]
# Attribute naming a ZeRO-3 parameter's manager (``megatron_core.zero.GatheredParameters`` reads it).
GATHER_MANAGER_ATTR = "zero3_param_gather"


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _tensors(value) -> Iterable[torch.Tensor]:
    """Every tensor in ``value``, also nested in tuples, lists, dicts and dataclass instances (DeepSpeed's
    ``apply_to_tensors_only`` recurses the same containers but dataclasses). A module's output tensor
    missed here gets no pre-backward hook, and its backward would read freed (NaN) parameters."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


class ParamGatherManager:
    """Installs the hooks described in the module docstring on ``module`` for its ``buffers``."""

    def __init__(self, module: torch.nn.Module, buffers: list[ParamAndGradBuffer]) -> None:
        self.buffers = buffers
        self.config = buffers[0].config
        self.zero3 = self.config.zero_stage == 3
        # Forward order: each buffer's buckets were laid out from the last parameter to the first.
        self.forward_order: list[Unit] = [(b, k) for b in buffers for k in reversed(b.buckets)]
        self.position = {id(k): i for i, (_, k) in enumerate(self.forward_order)}
        self.unit_of: dict[int, Unit] = {}
        for buffer in buffers:
            for p in buffer.params:
                self.unit_of[id(p)] = (buffer, buffer.param_ranges[id(p)][2])
                if self.zero3:
                    setattr(p, GATHER_MANAGER_ATTR, self)
        self.own_units: dict[int, list[Unit]] = {}
        for m in module.modules():
            units = self._dedup(self.unit_of[id(p)] for p in m._parameters.values()
                                if p is not None and id(p) in self.unit_of)
            self.own_units[id(m)] = units
            m.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            m.register_forward_hook(self._post_forward, with_kwargs=True)
        self.active: list[list[Unit]] = []
        # Units held gathered by ``megatron_core.zero.GatheredParameters`` blocks (pin / unpin).
        self.pinned: list[list[Unit]] = []
        # How many of those blocks have a ``modifier_rank``: their changes are published only on exit,
        # so a checkpoint saved inside one would mix them with the optimizer's unchanged main copy.
        self.modifying = 0
        # Buckets already used in the current forward pass: a module that uses an earlier bucket
        # again (the output layer and the tied word embedding) must not prefetch what follows it.
        self.used_in_forward: set[int] = set()
        # Seconds spent blocked waiting for gathers before a module could run (for bench/bench_zero.py:
        # the share of gather time prefetching hides).
        self.wait_seconds = 0.0

    @staticmethod
    def _dedup(units: Iterable[Unit]) -> list[Unit]:
        seen: dict[int, Unit] = {}
        for unit in units:
            seen.setdefault(id(unit[1]), unit)
        return list(seen.values())

    def _units_for(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> list[Unit]:
        passed = [self.unit_of[id(t)] for t in (*_tensors(args), *_tensors(kwargs))
                  if isinstance(t, torch.nn.Parameter) and id(t) in self.unit_of]
        own = self.own_units.get(id(module), [])
        return self._dedup([*own, *passed]) if passed else own

    # ---- gather, prefetch, free ---------------------------------------------------------------
    def ensure(self, units: list[Unit]) -> None:
        """Every unit's full parameters present: launch the missing gathers, then wait for all."""
        for buffer, bucket in units:
            if not bucket.gathered:
                buffer.launch_param_gather(bucket)
                bucket.grads_pending_release = {id(p) for p in bucket.params}
        started = time.perf_counter()
        for buffer, bucket in units:
            buffer.wait_param_gather(bucket)
        self.wait_seconds += time.perf_counter() - started

    def _prefetch_list(self, units: list[Unit], backward: bool) -> list[Unit]:
        budget = self.config.stage3_prefetch_bucket_size
        if not units or budget <= 0:
            return []
        positions = [self.position[id(k)] for _, k in units]
        order = self.forward_order
        if backward:
            start, step = min(positions) - 1, -1
        else:
            start, step = max(positions) + 1, 1
        out, total, i = [], 0, start
        while 0 <= i < len(order) and total < budget:
            if backward or id(order[i][1]) not in self.used_in_forward:
                out.append(order[i])
            total += order[i][1].end - order[i][1].start
            i += step
        return out

    def _launch(self, units: list[Unit]) -> None:
        for buffer, bucket in units:
            if not bucket.gathered:
                buffer.launch_param_gather(bucket)
                bucket.grads_pending_release = {id(p) for p in bucket.params}

    def _free_outside(self, keep: list[Unit]) -> None:
        if not self.config.reshard_after_forward:
            return
        kept = {id(k) for _, k in keep}
        for frame in (*self.active, *self.pinned):
            kept.update(id(k) for _, k in frame)
        for buffer, bucket in self.forward_order:
            if bucket.gathered and id(bucket) not in kept:
                buffer.release_params(bucket)

    # ---- hooks --------------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:  # the chunk's root module: a new forward pass
            self.used_in_forward.clear()
        units = self._units_for(module, args, kwargs)
        self.used_in_forward.update(id(k) for _, k in units)
        self.active.append(units)
        if not units:
            return
        self.ensure(units)
        if self.zero3:
            prefetch = self._prefetch_list(units, backward=False)
            if not _in_backward():
                self._free_outside(prefetch)
            self._launch(prefetch)

    def _post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
        units = self.active.pop() if self.active else []
        if not (self.zero3 and units and torch.is_grad_enabled()):
            return
        for t in _tensors(output):
            if t.requires_grad and t.grad_fn is not None:
                t.register_hook(self._before_backward_hook(units))

    def _before_backward_hook(self, units: list[Unit]):
        def hook(grad: torch.Tensor) -> None:
            self.ensure(units)
            self._launch(self._prefetch_list(units, backward=True))
        return hook

    def grad_ready(self, param: torch.nn.Parameter) -> None:
        """Called by the DDP gradient hook: free the bucket once all of its gradients are in."""
        if not (self.zero3 and self.config.reshard_after_forward):
            return
        buffer, bucket = self.unit_of[id(param)]
        if not bucket.gathered:
            return
        bucket.grads_pending_release.discard(id(param))
        held = (*self.active, *self.pinned)
        if not bucket.grads_pending_release and not any(bucket is k for frame in held for _, k in frame):
            buffer.release_params(bucket)

    def reset(self) -> None:
        """Forget modules left entered by a forward that raised (start of a step)."""
        self.active.clear()

    def units_of(self, params) -> list[Unit]:
        """The units (buckets) holding ``params``, each once."""
        return self._dedup(self.unit_of[id(p)] for p in params)

    def add_external(self, module: torch.nn.Module, param: torch.nn.Parameter) -> None:
        """Gather ``param``'s bucket whenever ``module`` runs forward, as its own parameters'.
        Raises ValueError when ``module`` is not part of the model this manager hooks."""
        units = self.own_units.get(id(module))
        if units is None:
            raise ValueError(f"register_external_parameter: {type(module).__name__} is not part of the model that "
                             f"holds the parameter; register it with a module of that model")
        units[:] = self._dedup([*units, self.unit_of[id(param)]])

    def pin(self, units: list[Unit], modifies: bool = False) -> None:
        """Gather ``units`` and keep them gathered (no forward frees them) until :meth:`unpin`;
        ``modifies``: the block publishes changes on exit (counted in :attr:`modifying`)."""
        self.ensure(units)
        self.pinned.append(units)
        self.modifying += modifies

    def unpin(self, units: list[Unit], modifies: bool = False) -> None:
        """End :meth:`pin` (same arguments); ZeRO-3 frees the units that no running module or other pin holds."""
        self.modifying -= modifies
        self.pinned = [frame for frame in self.pinned if frame is not units]
        held = {id(k) for frame in (*self.active, *self.pinned) for _, k in frame}
        for buffer, bucket in units:
            if id(bucket) not in held:
                buffer.release_params(bucket)

    def gather_all(self) -> None:
        """All buckets gathered (checkpoints, tests, evaluation of the full weights)."""
        self.ensure(self.forward_order)

    def release_all(self) -> None:
        """Free every non-persistent bucket (ZeRO-3) but those a GatheredParameters block holds."""
        pinned = {id(k) for frame in self.pinned for _, k in frame}
        for buffer, bucket in self.forward_order:
            if id(bucket) not in pinned:
                buffer.release_params(bucket)
