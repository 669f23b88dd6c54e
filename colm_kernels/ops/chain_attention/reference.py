"""Chain attention in plain PyTorch: materialise the mapped K/V per query head, then softmax.

``q``: ``(B, Sq, H, D)``; ``k``, ``v``: ``(B, Sk, Hkv, D)``; query head ``h`` reads kv head
``kv_head_index[h]``. Causal masking is bottom-right aligned (query ``i`` sees keys
``j <= i + Sk - Sq``); a query row that sees no key outputs zeros. With ``seq_chains``, head ``h`` of
sequence ``b`` is active only when ``head_chain[h] <= seq_chains[b]``; inactive heads output exact
zeros and pass no gradient. Scores and softmax in float32 (float64 for float64 inputs).

Variable-length packed batches (flash-attn's convention): with ``cu_seqlens_q`` / ``cu_seqlens_k``
(int32 ``(n_seq + 1,)`` offsets from 0), ``q`` is ``(total_q, H, D)`` and ``k``, ``v`` are
``(total_k, Hkv, D)``; sequence ``b`` is ``q[cu_q[b]:cu_q[b+1]]`` over ``k[cu_k[b]:cu_k[b+1]]``.
Each sequence runs through the same per-batch math as a batch of one (causal bottom-right aligned
per sequence, ``seq_chains[b]`` its scale). ``max_seqlen_*`` are grid bounds for the kernels; the
reference does not need them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _attend(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale) -> Tensor:
    """The per-batch math: ``(B, Sq, H, D)`` over ``(B, Sk, Hkv, D)``."""
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


def chain_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_head_index: Sequence[int],
    head_chain: Sequence[int],
    causal: bool,
    seq_chains: Optional[Tensor],
    softmax_scale: float,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    deterministic: bool = False,
) -> Tensor:
    """The op's math; ``deterministic`` is the kernels' backward choice (autograd of this code is
    deterministic either way) and ``max_seqlen_*`` are their grid bounds: both unused here."""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return _attend(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = [q[:0]]  # keeps dtype, device and head layout when there is no sequence
    for b in range(len(starts_q) - 1):
        qs = q[starts_q[b]:starts_q[b + 1]][None]
        ks, vs = (t[starts_k[b]:starts_k[b + 1]][None] for t in (k, v))
        sc = None if seq_chains is None else seq_chains[b:b + 1]
        outs.append(_attend(qs, ks, vs, kv_head_index, head_chain, causal, sc, softmax_scale)[0])
    return torch.cat(outs, dim=0)
