"""Chain attention in plain PyTorch: materialise the mapped K/V per query head, then softmax.

``q``: ``(B, Sq, H, D)``; ``k``, ``v``: ``(B, Sk, Hkv, D)``; query head ``h`` reads kv head
``kv_head_index[h]``. Causal masking is bottom-right aligned (query ``i`` sees keys
``j <= i + Sk - Sq``); a query row that sees no key outputs zeros. With ``seq_chains``, head ``h`` of
sequence ``b`` is active only when ``head_chain[h] <= seq_chains[b]``; inactive heads output exact
zeros and pass no gradient. Scores and softmax in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def chain_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_head_index: Sequence[int],
    head_chain: Sequence[int],
    causal: bool,
    seq_chains: Optional[Tensor],
    softmax_scale: float,
) -> Tensor:
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    index = torch.tensor(list(kv_head_index), device=q.device, dtype=torch.long)
    keys = k.index_select(2, index).to(compute)  # (B, Sk, H, D): the paper's repeated K
    values = v.index_select(2, index).to(compute)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), keys) * softmax_scale
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        visible = j <= i + (sk - sq)
        has_key = visible.any(-1, keepdim=True)
        # Rows with no visible key get finite scores, then zero probabilities: no NaN anywhere.
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, values)
    if seq_chains is not None:
        chain_of_head = torch.tensor(list(head_chain), device=q.device)
        active = chain_of_head[None, :] <= seq_chains.to(q.device)[:, None]  # (B, H)
        out = torch.where(active[:, None, :, None], out, torch.zeros((), dtype=compute, device=q.device))
    return out.to(q.dtype)
