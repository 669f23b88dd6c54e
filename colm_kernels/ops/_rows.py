"""Per-row scales (elastic batches, COLM_SPEC section 6): many scales in one batch.

A public op takes ``seq_chains``: an integer tensor whose shape is a prefix of its input's leading
dims (``(B,)``: one scale per sequence; the whole leading shape: one per token), each value the
last active chain of that row. The ops see it as ``row_chains``: one int32 per row of their 2-D
``(rows, width)`` view. A row's outputs beyond its scale are exact zeros and get no gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._tables import index_vector
from ._checks import check_int_values, check_like, check_tensor


def row_chains(seq_chains, x: Tensor, scale: int, check_values: bool, *, name: str = "seq_chains",
               x_name: str = "x") -> Optional[Tensor]:
    """``seq_chains`` checked against ``x`` (``(..., width)``) and the call's scale (values in
    ``[0, scale]``; on the host only with ``check_values``), expanded to one int32 per row of
    ``x.reshape(-1, width)``; None stays None."""
    if seq_chains is None:
        return None
    check_tensor(name, seq_chains, min_ndim=1, kind="int")
    check_like(x_name, x, dtype=False, **{name: seq_chains})
    lead = tuple(x.shape[:-1])
    if seq_chains.dim() > len(lead) or tuple(seq_chains.shape) != lead[: seq_chains.dim()]:
        raise ValueError(
            f"{name} must have a prefix of {x_name}'s leading shape {lead} (one scale per sequence "
            f"{lead[:1]} or per row {lead}), got shape {tuple(seq_chains.shape)}"
        )
    if check_values:
        check_int_values(name, seq_chains, 0, scale, what=f"the last active chain of each row, at most the call's scale {scale}")
    per_row = seq_chains.reshape(*seq_chains.shape, *([1] * (len(lead) - seq_chains.dim()))).expand(lead)
    return per_row.reshape(-1).to(torch.int32).contiguous()


def column_chains(widths: Sequence[int], device) -> Tensor:
    """The chain of every column of a ``(rows, sum(widths))`` output (a cached device vector: no
    host-to-device copy per call)."""
    return index_vector([c for c, w in enumerate(widths) for _ in range(w)], device)


def active(widths: Sequence[int], rows: Tensor) -> Tensor:
    """``(rows, sum(widths))`` bool: column c of row r is active iff its chain <= ``rows[r]``."""
    return column_chains(widths, rows.device)[None, :] <= rows[:, None].to(torch.int64)


def zero_inactive(y: Tensor, widths: Sequence[int], rows: Optional[Tensor]) -> Tensor:
    """``y`` (``(rows, sum(widths))``) with every column beyond its row's scale an exact zero (and
    so no gradient through it); ``rows`` None: ``y`` itself."""
    if rows is None:
        return y
    return torch.where(active(widths, rows), y, torch.zeros((), dtype=y.dtype, device=y.device))
