"""Comparison helpers shared by the equivalence tests.

The promise is element-wise: every entry within ``tol`` relative of the expected entry. Entries
whose expected magnitude is below ``floor`` (default 1e-3, absolute) are held to ``tol * floor``
absolute instead, because a relative bound on a value that is zero up to rounding (a gradient that
cancels, a parameter that crossed zero) would demand bit equality from a different summation order.
With the defaults that slack is 1e-8 absolute, far below anything a real bug produces at these sizes.
"""
from __future__ import annotations

import torch

DEFAULT_FLOOR = 1e-3


def rel_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = DEFAULT_FLOOR) -> float:
    """max over entries of |actual - expected| / max(|expected|, floor) (computed in float64).

    Raises AssertionError when the shapes differ.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not expected.numel():
        return 0.0
    err = (actual - expected).abs() / expected.abs().clamp(min=floor)
    return float(err.nan_to_num(nan=float("inf")).max().item())


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "",
                     floor: float = DEFAULT_FLOOR) -> None:
    """Element-wise ``|actual - expected| <= tol * max(|expected|, floor)``; the message names the worst entry."""
    err = rel_error(actual, expected, floor)
    if not err <= tol:
        a, e = actual.detach().double(), expected.detach().double()
        per = ((a - e).abs() / e.abs().clamp(min=floor)).nan_to_num(nan=float("inf"))
        index = tuple(int(i) for i in torch.unravel_index(per.argmax(), per.shape)) if per.dim() else ()
        raise AssertionError(f"{what}: element-wise relative error {err:.3e} > {tol:.0e} at {index} "
                             f"(actual {a[index].item():.8g}, expected {e[index].item():.8g}, floor {floor:g})")
