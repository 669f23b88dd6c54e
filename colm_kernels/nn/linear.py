"""``ChainLinear``: the paper's Chain-of-Linear layer (Algorithm 1) over the ``chain_linear`` op."""
from __future__ import annotations

from torch import Tensor, nn

from ..chains import ChainsLike, as_chains
from ..ops.chain_linear.api import chain_linear
from .adapters import add_chain_deltas, base_linear, is_adapted


class ChainLinear(nn.Module):
    """Output chain i is ``mlps[i](x[..., :P_i_in])``: a block-lower-triangular linear layer.

    Parameters are the paper's: ``mlps.{i}`` is ``nn.Linear(P_i_in, d_i_out)``, so its state-dict
    keys are ``mlps.{i}.weight`` / ``mlps.{i}.bias`` and a checkpoint written by code from the paper
    loads with ``strict=True``. Freezing a chain is ``mlps[i].requires_grad_(False)``; the weight
    gradient of a frozen chain is then not computed.

    LoRA: PEFT's adapters on the ``mlps.{i}`` children (``target_modules="all-linear"``, or
    ``colm_kernels.integrations.peft`` for ``target_modules=["wq", ...]``) are honoured: the base
    weights still run as one ``chain_linear``, and child i's low-rank term is added to chain i's
    outputs (it reads ``x[..., :P_i_in]``: the layer stays block-lower-triangular).
    """

    def __init__(self, in_features: int, out_features: int, chains: ChainsLike, bias: bool = True):
        super().__init__()
        self.chains = as_chains(chains)
        self.in_features = in_features
        self.out_features = out_features
        in_prefixes = self.chains.prefixes(in_features, name="in_features")
        out_widths = self.chains.widths(out_features, name="out_features")
        self.mlps = nn.ModuleList(nn.Linear(p, d, bias=bias) for p, d in zip(in_prefixes, out_widths))

    def forward(self, x: Tensor, chain=None, *, seq_chains=None, check_values: bool = True) -> Tensor:
        """``seq_chains``: optional per-row scales (``chain_linear``'s elastic batches): a row's
        outputs beyond its scale are exact zeros."""
        bases = [base_linear(m) for m in self.mlps]
        weights = [m.weight for m in bases]
        biases = None if bases[0].bias is None else [m.bias for m in bases]
        y = chain_linear(x, weights, biases, self.chains, chain, seq_chains=seq_chains,
                         check_values=check_values)
        if not self.adapted():
            return y
        return add_chain_deltas(y, self.mlps, x, self.chains.check_chain(chain),
                                self.chains.prefixes(self.in_features), self.chains.offsets(self.out_features),
                                seq_chains)

    def adapted(self) -> bool:
        """Whether PEFT has wrapped any ``mlps`` child (a LoRA layer around its ``nn.Linear``)."""
        return any(is_adapted(m) for m in self.mlps)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"chains={self.chains.sizes}, bias={base_linear(self.mlps[0]).bias is not None}")
