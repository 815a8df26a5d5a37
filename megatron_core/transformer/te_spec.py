"""Transformer Engine wrappers with the constructor signature of our parallel layers.

Importing this module never fails: without ``transformer_engine`` the classes exist but raise a
clear error when built. Each wrapper draws the full weight from our seeded init and keeps its TP
shard, so a TE model starts from the same weights as a local one. (Untested here: TE cannot be
installed on the CPU development machine.)
"""
from __future__ import annotations

import torch

from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.tensor_parallel.utils import InitMethod, set_tensor_model_parallel_attributes, shard_of_master

try:
    import transformer_engine.pytorch as te  # noqa: F401
    HAVE_TE, TE_IMPORT_ERROR = True, None
except Exception as exc:  # noqa: BLE001 - any failure means "no TE here", reported once by the spec picker
    te, HAVE_TE, TE_IMPORT_ERROR = None, False, f"{type(exc).__name__}: {exc}"


def require_te() -> None:
    """Raise a clear error when the Transformer Engine spec is asked for without TE."""
    if not HAVE_TE:
        raise ImportError(f"the Transformer Engine layer spec needs transformer_engine, which failed to import "
                          f"({TE_IMPORT_ERROR}); install it on a CUDA machine or use get_gpt_layer_local_spec()")


def _load_seeded_shard(weight: torch.Tensor, full_shape: tuple[int, int], dim: int, stride: int,
                       init_method: InitMethod | None, rank: int, world: int) -> None:
    if init_method is None:
        return
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    with torch.no_grad():
        weight.copy_(shard_of_master(master, dim, stride, rank, world))
    set_tensor_model_parallel_attributes(weight, True, dim, stride)


class _TELinear(torch.nn.Module):
    """te.Linear in column or row mode returning ``(output, bias or None)`` like our layers."""

    def __init__(self, mode: str, input_size: int, output_size: int, *, bias: bool = True,
                 init_method: InitMethod | None = None, stride: int = 1, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, skip_bias_add: bool = False,
                 parallel_state: ParallelState | None = None, **unused) -> None:
        super().__init__()
        require_te()
        ps = get_parallel_state(parallel_state)
        self.skip_bias_add = skip_bias_add
        self.linear = te.Linear(input_size, output_size, bias=bias, sequence_parallel=sequence_parallel,
                                tp_group=ps.tp_group, tp_size=ps.tp_size, parallel_mode=mode,
                                params_dtype=params_dtype, return_bias=True)
        dim = 0 if mode == "column" else 1
        _load_seeded_shard(self.linear.weight, (output_size, input_size), dim, stride, init_method,
                           ps.tp_rank, ps.tp_size)

    def forward(self, x: torch.Tensor):
        out, bias = self.linear(x)
        if self.skip_bias_add or bias is None or bias.numel() == 0:
            return out, (bias if self.skip_bias_add else None)
        return out + bias, None


class TEColumnParallelLinear(_TELinear):
    """Column-parallel te.Linear."""

    def __init__(self, input_size: int, output_size: int, **kwargs) -> None:
        super().__init__("column", input_size, output_size, **kwargs)


class TERowParallelLinear(_TELinear):
    """Row-parallel te.Linear."""

    def __init__(self, input_size: int, output_size: int, **kwargs) -> None:
        super().__init__("row", input_size, output_size, **kwargs)


def TENorm(config, hidden_size: int, eps: float | None = None) -> torch.nn.Module:  # noqa: N802 - a factory
    """te.LayerNorm or te.RMSNorm as ``config.normalization`` says (TE's ``zero_centered_gamma`` is
    ``config.layernorm_zero_centered_gamma``, as Megatron-core passes it)."""
    require_te()
    eps = config.layernorm_epsilon if eps is None else eps
    cls = te.LayerNorm if config.normalization == "LayerNorm" else te.RMSNorm
    norm = cls(hidden_size, eps=eps, sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
               zero_centered_gamma=config.layernorm_zero_centered_gamma)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm
