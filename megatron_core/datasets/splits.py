"""Megatron-LM's ``--split`` string ("949,50,1") and the document ranges it cuts a dataset into."""
from __future__ import annotations

SPLIT_NAMES = ("train", "valid", "test")


def _unquote(split: str) -> str:
    """``'99,1,0'`` or ``"99,1,0"`` -> ``99,1,0``: one pair of matching quotes around the whole value.

    Megatron-LM's Llama 3 example passes ``--split "'99,1,0'"`` (its shell quoting leaves the quotes in
    the value); Megatron-LM reads it because ``parse_and_normalize_split`` takes the numbers out with
    ``re.findall(r"[.0-9]+", split)``. Only surrounding quotes are dropped here: that regex would also
    read ``-1,2`` as ``1,2`` or ``9 9,1`` as three weights, which are refused instead.
    """
    text = split.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` -> ``[0.949, 0.05, 0.001]``: up to three non-negative weights, normalized.

    Weights are separated by ``,`` or ``/``, and the whole value may be in single or double quotes (as
    Megatron-LM accepts). Raises ValueError, one line naming --split, for anything else.
    """
    pieces = [p.strip() for p in _unquote(str(split)).replace("/", ",").split(",") if p.strip()]
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
