"""``ModuleSpec``: which class builds each part of a layer, so a new architecture is a new spec.

A spec names a module class (or a factory function), fixed keyword ``params``, and, for
composite modules, a ``submodules`` dataclass of further specs. ``build_module`` instantiates it
with the caller's arguments; a local (plain torch) spec, a fused-kernel spec and a Transformer
Engine spec differ only in the classes they name (see ``layer_specs``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class IdentityOp(torch.nn.Module):
    """A placeholder that returns its first input unchanged (e.g. no norm before the MLP)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Return ``x`` unchanged; further arguments are accepted and ignored."""
        return x


@dataclass
class ModuleSpec:
    """A module class or factory, its fixed keyword arguments and the specs of its submodules."""

    module: type | Callable[..., Any]
    params: dict[str, Any] = field(default_factory=dict)
    submodules: Any | None = None


def build_module(spec: ModuleSpec | type | Callable[..., Any] | None, *args: Any, **kwargs: Any) -> Any:
    """Instantiate ``spec`` with ``args`` and ``kwargs`` (the spec's ``params`` are defaults the
    caller may override); ``submodules`` is passed on when the spec has one. None builds an IdentityOp."""
    if spec is None:
        return IdentityOp()
    if not isinstance(spec, ModuleSpec):
        return spec(*args, **kwargs)
    merged = {**spec.params, **kwargs}
    if spec.submodules is not None:
        merged["submodules"] = spec.submodules
    try:
        return spec.module(*args, **merged)
    except TypeError as exc:
        name = getattr(spec.module, "__qualname__", repr(spec.module))
        raise TypeError(f"building {name} from its ModuleSpec failed: {exc}") from exc
