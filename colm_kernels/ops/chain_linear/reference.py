"""Chain-of-Linear in plain PyTorch: the paper's per-chain loop (Algorithm 1).

``y = cat_i(x[:, :P_i] @ W_i^T + b_i)`` with ``W_i`` of shape ``(d_i, P_i)``. Works in any dtype on
any device; it is what every kernel backend is checked against, in float64. ``row_chains`` (one
int per row of a 2-D ``x``, elastic batches): outputs of chains beyond a row's scale are exact zeros.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._rows import zero_inactive


def chain_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                 row_chains: Optional[Tensor] = None) -> Tensor:
    outs = []
    for i, w in enumerate(weights):
        y = x[..., : w.shape[1]] @ w.transpose(0, 1)
        outs.append(y + biases[i] if len(biases) else y)
    return zero_inactive(torch.cat(outs, dim=-1), [w.shape[0] for w in weights], row_chains)


def chain_linear_out_shape(x: Tensor, weights: Sequence[Tensor]) -> tuple[int, ...]:
    """Output shape; the fake implementation of every backend uses it."""
    return (*x.shape[:-1], sum(w.shape[0] for w in weights))
