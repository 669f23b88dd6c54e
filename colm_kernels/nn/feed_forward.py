"""``ChainFeedForward``: SwiGLU ``w2(silu(w1 x) * w3 x)`` with Chain-of-Linear projections."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..chains import ChainsLike, as_chains
from .linear import ChainLinear


class ChainFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, chains: ChainsLike):
        super().__init__()
        chains = as_chains(chains)
        self.w1 = ChainLinear(dim, hidden_dim, chains, bias=False)
        self.w2 = ChainLinear(hidden_dim, dim, chains, bias=False)
        self.w3 = ChainLinear(dim, hidden_dim, chains, bias=False)

    def forward(self, x: Tensor, chain=None) -> Tensor:
        return self.w2(F.silu(self.w1(x, chain)) * self.w3(x, chain), chain)
