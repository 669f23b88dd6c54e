"""Multi-chain (Matryoshka-style) cross-entropy in plain PyTorch: one loss per scale.

``logits_k = hidden[:, :P_k] @ weight[:, :P_k]^T`` is built up one chain at a time
(``logits_k = logits_(k-1) + hidden_k @ weight_k^T``) and ``loss_k`` is the mean cross-entropy over
targets that are not ``ignore_index``. This naive version materialises every ``(N, V)`` logit
tensor. Math in float32 (float64 for float64 inputs); the result has that dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def multi_chain_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, offsets: Sequence[int], ignore_index: int
) -> Tensor:
    compute = loss_dtype(hidden.dtype)
    logits = None
    losses = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        part = hidden[:, lo:hi].to(compute) @ weight[:, lo:hi].to(compute).T
        logits = part if logits is None else logits + part
        losses.append(F.cross_entropy(logits, targets, ignore_index=ignore_index))
    return torch.stack(losses)
