"""Megatron-LM's ``--split`` string ("949,50,1") and the document ranges it cuts a dataset into."""
from __future__ import annotations

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` -> ``[0.949, 0.05, 0.001]``: up to three non-negative weights, normalized."""
    pieces = [p.strip() for p in str(split).replace("/", ",").split(",") if p.strip()]
    if not 1 <= len(pieces) <= 3:
        raise ValueError(f"--split {split!r} must have one to three comma-separated weights, e.g. 949,50,1")
    try:
        weights = [float(p) for p in pieces]
    except ValueError:
        raise ValueError(f"--split {split!r} has a non-numeric weight; use e.g. 949,50,1") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r} needs non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """Cumulative ``[begin, end)`` fractions per split; None for a split with zero weight."""
    bounds, start = [], 0.0
    for weight in parse_split(split):
        end = start + weight
        bounds.append(None if weight == 0 else (start, end))
        start = end
    return bounds


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """Document ``[begin, end)`` per split, rounding fraction * count as Megatron-LM does.

    Splits are cut at document boundaries, so a split may end up with zero documents when the
    dataset is small; callers decide whether that split is needed.
    """
    ranges: list[tuple[int, int] | None] = []
    for bound in split_matrix(split):
        if bound is None:
            ranges.append(None)
        else:
            ranges.append((int(round(bound[0] * num_documents)), int(round(bound[1] * num_documents))))
    return ranges
