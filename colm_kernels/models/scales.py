"""Scales of a model call: an int (one for the whole batch), None (the whole model) or an integer
tensor ``(B,)`` (one per sequence, elastic serving: COLM_SPEC section 6).

A tensor runs the call at the largest scale the tensor may hold with ``seq_chains`` passed to every
op: a sequence's features beyond its own scale are exact zeros, so it gets the result of running
alone at its scale (the output head reads zeros beyond it: they add nothing to the logits).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..chains import Chains
from ..ops._checks import check_int_values


@dataclasses.dataclass(frozen=True)
class Scale:
    """One call's scale: ``chain`` for the whole call and, with per-sequence scales, ``seq``
    ``(B,)`` (every value at most ``chain``); ``seq`` None: every sequence runs at ``chain``."""

    chain: int
    seq: Optional[Tensor] = None


def check_chain_tensor(chains: Chains, chain: Tensor, batch: int, device, *, name: str = "chain",
                       check_values: bool = True) -> None:
    """An integer ``(batch,)`` tensor on ``device`` with values in ``[0, n_chains)`` (values: one
    host sync, with ``check_values``)."""
    if chain.dtype == torch.bool or chain.is_floating_point() or chain.is_complex():
        raise TypeError(f"{name} must be an int, None or an integer tensor of shape ({batch},) (one scale per "
                        f"sequence), got a tensor of dtype {chain.dtype}")
    if tuple(chain.shape) != (batch,):
        raise ValueError(f"{name} as a tensor must have shape ({batch},) (one scale per sequence of the "
                         f"batch), got shape {tuple(chain.shape)}")
    if chain.device != torch.device(device):
        raise ValueError(f"{name} is on {chain.device} but the tokens are on {device}")
    if check_values:
        check_int_values(name, chain, 0, chains.n - 1,
                         what=f"the last active chain of each sequence, for chains={chains.sizes}")


def resolve_chain(chains: Chains, chain, batch: int, device, *, name: str = "chain") -> Scale:
    """``chain`` (an int, None, or a ``(batch,)`` integer tensor) as a ``Scale``. A tensor runs
    at the full width (the output shapes do not depend on its values) and is checked once here."""
    if isinstance(chain, Tensor):
        check_chain_tensor(chains, chain, batch, device, name=name)
        return Scale(chains.n - 1, chain)
    return Scale(chains.check_chain(chain, name=name))
