"""The multi-chain cross-entropy with a vocabulary-parallel head.

Rank r holds rows ``[v0, v0 + V_r)`` of the head. For every scale s the full-vocabulary loss of a
token is ``lse_s - logit_s[target]`` with ``lse_s = logsumexp_r(lse_s^r)`` over the ranks' local
log-sum-exps; the target logit lives on one rank. Each rank gets its ``lse_s^r`` from the fused
``multi_chain_cross_entropy`` on its shard (``reduction="none"``, every row given a local target
``t``: it returns ``lse_s^r - logit_s^r[t]``) plus that logit, recomputed as a per-row dot product
over the chain segments. Communicated per step: ``(n_scales, tokens)`` log-sum-exps (all-gather)
and target logits (all-reduce), never a logit tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ....chains import as_chains
from ....ops.multi_chain_cross_entropy.api import multi_chain_cross_entropy
from .regions import all_gather_stack, all_reduce_sum, replicated_local


def _target_logits(hidden: Tensor, rows: Tensor, widths: list[int], dtype) -> Tensor:
    """``(n_scales, N)``: ``hidden[n, :P_s] . rows[n, :P_s]`` for every scale s (cumulative sums
    of the per-chain dot products)."""
    products = hidden.to(dtype) * rows[:, : hidden.shape[-1]].to(dtype)
    per_chain = torch.stack([seg.sum(-1) for seg in products.split(widths, dim=-1)])
    return per_chain.cumsum(0)


def vocab_parallel_loss_sums(hidden: DTensor, weight: DTensor, vocab_start: int, labels: Tensor, chains,
                             ignore_index: int) -> Tensor:
    """The summed cross-entropy of every scale ``0..k`` ``(k + 1,)`` (``k`` read off ``hidden``'s
    width, as ``multi_chain_cross_entropy``), the same plain tensor on every TP rank.

    ``hidden``: the final normed hidden states, a replicated DTensor ``(B, S, P_(k+1))``;
    ``weight``: the head ``(V, D)``, ``Shard(0)`` on the TP mesh, this rank's rows starting at
    ``vocab_start``; ``labels`` ``(B, S)`` (``ignore_index`` rows count nowhere)."""
    chains = as_chains(chains)
    mesh = weight.device_mesh
    h = replicated_local(hidden)
    w = weight.to_local()
    h2 = h.reshape(-1, h.shape[-1])
    t = labels.reshape(-1)
    valid = t != ignore_index
    local = t - vocab_start
    mine = valid & (local >= 0) & (local < w.shape[0])
    local = torch.where(mine, local, torch.zeros_like(local))  # any row of the shard: its lse is what counts
    shifted = multi_chain_cross_entropy(h2, w, local, chains, ignore_index, reduction="none", check_values=False)
    k = chains.scale_of_width(h2.shape[-1], w.shape[1], name="hidden.shape[-1]")
    widths = list(chains.widths(w.shape[1])[: k + 1])
    target = _target_logits(h2, w[local], widths, shifted.dtype)
    lse = torch.logsumexp(all_gather_stack(shifted + target, mesh), dim=0)
    target = all_reduce_sum(torch.where(mine, target, torch.zeros_like(target)), mesh)
    return torch.where(valid, lse - target, torch.zeros_like(lse)).sum(-1)
