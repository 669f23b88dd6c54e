"""``ChainFeedForward``: SwiGLU ``w2(silu(w1 x) * w3 x)`` with Chain-of-Linear projections.

The gate ``silu(w1 x) * w3 x`` is one ``chain_swiglu`` call (one fused kernel on the ``triton``
backend: x read once for both projections, no separate silu/mul pass); ``w2`` is a ``ChainLinear``.
Parameters and state-dict keys are the paper's: ``w1.mlps.{i}.weight``, ``w2...``, ``w3...``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..chains import ChainsLike, as_chains
from ..ops.chain_swiglu.api import chain_swiglu
from .linear import ChainLinear


class ChainFeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, chains: ChainsLike):
        super().__init__()
        chains = as_chains(chains)
        self.chains = chains
        self.w1 = ChainLinear(dim, hidden_dim, chains, bias=False)
        self.w2 = ChainLinear(hidden_dim, dim, chains, bias=False)
        self.w3 = ChainLinear(dim, hidden_dim, chains, bias=False)

    def forward(self, x: Tensor, chain=None, *, seq_chains=None, check_values: bool = True) -> Tensor:
        """``seq_chains``: optional per-row scales (hidden and output features beyond a row's
        scale are exact zeros). With LoRA adapters on ``w1`` or ``w3`` the gate runs unfused, on
        their ``ChainLinear`` forwards (base GEMMs still one ``chain_linear`` each)."""
        if self.w1.adapted() or self.w3.adapted():
            gate = self.w1(x, chain, seq_chains=seq_chains, check_values=check_values)
            h = F.silu(gate) * self.w3(x, chain, seq_chains=seq_chains, check_values=False)
        else:
            w1 = [m.weight for m in self.w1.mlps]
            w3 = [m.weight for m in self.w3.mlps]
            h = chain_swiglu(x, w1, w3, self.chains, chain, seq_chains=seq_chains, check_values=check_values)
        # the gate already checked seq_chains' values against this chain
        return self.w2(h, chain, seq_chains=seq_chains, check_values=False)
