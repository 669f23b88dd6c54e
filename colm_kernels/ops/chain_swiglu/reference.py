"""Chain SwiGLU in plain PyTorch: two Chain-of-Linears (the paper's per-chain loop) and silu * mul.

``h = silu(x W1^T) * (x W3^T)`` with per-chain blocks ``W1_i``, ``W3_i`` of shape ``(d_i, P_i)``
(COLM_SPEC section 3, the FFN's ``silu(w1 x) * w3 x``). Any dtype, any device; every kernel backend
is checked against it in float64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from ..chain_linear.reference import chain_linear


def chain_swiglu(x: Tensor, w1: Sequence[Tensor], w3: Sequence[Tensor],
                 row_chains: Optional[Tensor] = None) -> Tensor:
    """``row_chains``: per-row scales (2-D ``x``); hidden features beyond them are exact zeros."""
    return F.silu(chain_linear(x, w1, [], row_chains)) * chain_linear(x, w3, [], row_chains)


def chain_swiglu_out_shape(x: Tensor, w1: Sequence[Tensor]) -> tuple[int, ...]:
    """Output shape; the fake implementation of every backend uses it."""
    return (*x.shape[:-1], sum(w.shape[0] for w in w1))
