"""Per-chain RMSNorm in plain PyTorch.

Each chain segment ``x_i`` (columns ``offsets[i]:offsets[i+1]``) is normalised on its own:
``x_i / sqrt(mean(x_i^2) + eps) * g_i``. Statistics in float32 (or float64 for float64 inputs),
output in the input dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._rows import zero_inactive


def chain_rmsnorm(x: Tensor, weight: Tensor, offsets: Sequence[int], eps: float,
                  row_chains: Optional[Tensor] = None) -> Tensor:
    """``row_chains``: per-row scales (2-D ``x``); segments beyond them are exact zeros."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    segments = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        seg = xf[..., lo:hi]
        segments.append(seg * torch.rsqrt(seg.pow(2).mean(-1, keepdim=True) + eps))
    y = (torch.cat(segments, dim=-1) * weight.to(compute)).to(x.dtype)
    return zero_inactive(y, [b - a for a, b in zip(offsets[:-1], offsets[1:])], row_chains)
