"""``ChainRMSNorm``: RMSNorm of each chain's segment, over the ``chain_rmsnorm`` op."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..chains import ChainsLike, as_chains
from ..ops.chain_rmsnorm.api import chain_rmsnorm


class ChainRMSNorm(nn.Module):
    """One gain vector of length ``dim`` (key ``weight``); each chain segment normalised alone.

    ``forward(x, chain=None)``: ``x`` has the active width ``P_(chain+1)``; with ``chain=None`` the
    scale is read off ``x``'s width. ``seq_chains`` (keyword): per-row scales, as in
    ``chain_rmsnorm`` (segments beyond a row's scale are exact zeros).
    """

    def __init__(self, dim: int, chains: ChainsLike, eps: float = 1e-5):
        super().__init__()
        self.chains = as_chains(chains)
        self.chains.widths(dim, name="dim")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, chain=None, *, seq_chains=None, check_values: bool = True) -> Tensor:
        return chain_rmsnorm(x, self.weight, self.chains, self.eps, chain, seq_chains=seq_chains,
                             check_values=check_values)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, chains={self.chains.sizes}, eps={self.eps}"
