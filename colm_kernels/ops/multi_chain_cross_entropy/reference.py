"""Multi-chain (Matryoshka-style) cross-entropy in plain PyTorch: one loss per scale.

``logits_s = hidden[:, :P_(s+1)] @ weight[:, :P_(s+1)]^T`` is built up one chain at a time
(``logits_s = logits_(s-1) + hidden_s @ weight_s^T``); with ``softcap`` each scale's logits become
``softcap * tanh(logits_s / softcap)``. Per row ``i`` with a target that is not ``ignore_index``:

    ce_s[i] = F.cross_entropy(logits_s[i], t_i, label_smoothing=eps)   (PyTorch's definition)
    z_s[i]  = lse_square_scale * logsumexp(logits_s[i])^2               (z-loss)

Ignored rows count 0. ``reduction``: ``mean`` divides the sums over rows by the number of rows that
are not ignored (NaN when there are none, as in PyTorch), ``sum`` sums, ``none`` keeps the rows.
Per-row scales (``row_chains``, one int per row): row ``i`` counts in scales ``0..row_chains[i]``
only, as an ignored row in the others (so ``mean`` divides scale s by the rows that reach it), and
its hidden columns beyond its own prefix width are never read (zeros, no gradient).
A target outside ``[0, V)`` (values unchecked) makes its row NaN at every scale, forward and
backward (the row's hidden state is poisoned with NaN before the head), never an index error.

The op returns ``(2, NS)`` (``(2, NS, N)`` for ``none``): row 0 the loss (cross-entropy plus
z-loss), row 1 the z-loss alone; with ``weights`` (``(NS,)``, a reduced loss) ``(2,)``, the
weighted sums over the scales of those two rows. This naive version materialises every ``(N, V)`` logit tensor.
Math in float32 (float64 for float64 inputs); the result has that dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._rows import zero_inactive

REDUCTIONS = ("mean", "sum", "none")


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_shape(n_scales: int, n_rows: int, reduction: str, weighted: bool = False) -> tuple:
    """The op's output shape (every backend and the fake implementations use it)."""
    if weighted:
        return (2,)
    return (2, n_scales, n_rows) if reduction == "none" else (2, n_scales)


def multi_chain_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, offsets: Sequence[int], ignore_index: int,
    reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
    softcap: float = 0.0, row_chains: Optional[Tensor] = None, weights: Optional[Tensor] = None,
) -> Tensor:
    compute = loss_dtype(hidden.dtype)
    valid = targets != ignore_index
    widths = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
    hidden = zero_inactive(hidden, widths, row_chains)
    bad = valid & ((targets < 0) | (targets >= weight.shape[0]))
    safe = torch.where(bad, torch.zeros_like(targets), targets)
    # NaN rows for unchecked out-of-range targets: NaN losses and NaN gradients, no gather past V.
    poison = torch.where(bad, float("nan"), 0.0).to(compute)[:, None]
    h = hidden.to(compute) + poison
    logits = None
    rows, zrows, counted = [], [], []
    for s, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        keep = valid if row_chains is None else valid & (row_chains >= s)
        part = h[:, lo:hi] @ weight[:, lo:hi].to(compute).T
        logits = part if logits is None else logits + part
        z = softcap * torch.tanh(logits / softcap) if softcap else logits
        ce = F.cross_entropy(z, safe, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
        zl = torch.where(keep, lse_square_scale * torch.logsumexp(z, dim=-1) ** 2, 0.0)
        rows.append(torch.where(keep, ce, 0.0) + zl)
        zrows.append(zl)
        counted.append(keep.sum())
    out = torch.stack([torch.stack(rows), torch.stack(zrows)])  # (2, NS, N)
    if reduction == "none":
        return out
    total = out.sum(-1)
    total = total / torch.stack(counted) if reduction == "mean" else total
    return total if weights is None else (total * weights.to(compute)).sum(-1)  # (2,): plainly
