"""Chain attention in plain PyTorch: materialise the mapped K/V per query head, then softmax.

``q``: ``(B, Sq, H, D)``; ``k``, ``v``: ``(B, Sk, Hkv, D)``; query head ``h`` reads kv head
``kv_head_index[h]``. Causal masking is bottom-right aligned (query ``i`` sees keys
``j <= i + Sk - Sq``); a query row that sees no key outputs zeros. With ``seq_chains``, head ``h`` of
sequence ``b`` is active only when ``head_chain[h] <= seq_chains[b]``; inactive heads output exact
zeros and pass no gradient. Scores and softmax in float32 (float64 for float64 inputs).

Variable-length packed batches (flash-attn's convention): with ``cu_seqlens_q`` / ``cu_seqlens_k``
(int32 ``(n_seq + 1,)`` offsets from 0), ``q`` is ``(total_q, H, D)`` and ``k``, ``v`` are
``(total_k, Hkv, D)``; sequence ``b`` is ``q[cu_q[b]:cu_q[b+1]]`` over ``k[cu_k[b]:cu_k[b+1]]``.
Each sequence gets the same math as a batch of one (causal bottom-right aligned per sequence,
``seq_chains[b]`` its scale), computed as one packed batch under a block-diagonal mask. ``max_seqlen_*`` are grid bounds for the kernels; the
reference does not need them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..._tables import index_vector


def attend(q: Tensor, k: Tensor, v: Tensor, kv_head_index: Sequence[int], visible: Optional[Tensor],
           active: Optional[Tensor], softmax_scale: float, key_ok: Optional[Tensor] = None) -> Tensor:
    """The math of every layout: ``q`` ``(B, Sq, H, D)`` over ``k``, ``v`` ``(B, Sk, Hkv, D)``.

    ``visible``: None (every key) or bool ``(B or 1, Sq, Sk)``; a row that sees no key outputs
    zeros. ``active``: None or bool ``(B or 1, Sq or 1, H)``, False rows output exact zeros (and
    pass no gradient). ``key_ok``: None or bool ``(B, Sk)``: keys and values outside it are never
    read (they may hold NaN). No host sync: every mask is built on the device."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    index = index_vector(kv_head_index, q.device)
    keys = k.index_select(2, index).to(compute)  # (B, Sk, H, D): the paper's repeated K
    values = v.index_select(2, index).to(compute)
    zero = torch.zeros((), dtype=compute, device=q.device)
    if key_ok is not None:
        keys = torch.where(key_ok[:, :, None, None], keys, zero)
        values = torch.where(key_ok[:, :, None, None], values, zero)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), keys) * softmax_scale
    if visible is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        visible = visible[:, None]  # (B, 1, Sq, Sk)
        has_key = visible.any(-1, keepdim=True)
        # Rows with no visible key get finite scores, then zero probabilities: no NaN anywhere.
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, values)
    if active is not None:
        out = torch.where(active[..., None], out, zero)
    return out.to(q.dtype)


def causal_mask(sq: int, sk: int, device) -> Tensor:
    """``(1, sq, sk)``: query ``i`` sees key ``j`` iff ``j <= i + sk - sq`` (bottom-right)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return (j <= i + (sk - sq))[None]


def active_heads(head_chain: Sequence[int], seq_chains: Optional[Tensor], device) -> Optional[Tensor]:
    """``(B, 1, H)``: head ``h`` of sequence ``b`` is active iff ``head_chain[h] <= seq_chains[b]``."""
    if seq_chains is None:
        return None
    return (index_vector(head_chain, device)[None, :] <= seq_chains[:, None].long())[:, None, :]


def _packed_positions(cu: Tensor, total: int):
    """Per packed row of a varlen tensor: ``(sequence, position in it, its length)``."""
    cu = cu.long()
    rows = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], rows, right=True)  # empty sequences own no row
    start = cu[seq]
    return seq, rows - start, cu[seq + 1] - start


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
    deterministic either way) and ``max_seqlen_*`` are their grid bounds: both unused here.
    Varlen batches run as one packed sequence whose mask keeps each row inside its own sequence
    (no host read of ``cu_seqlens``)."""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        visible = causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
        return attend(q, k, v, kv_head_index, visible, active_heads(head_chain, seq_chains, q.device),
                      softmax_scale)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    seq_q, pos_q, len_q = _packed_positions(cu_seqlens_q, q.shape[0])
    seq_k, pos_k, len_k = _packed_positions(cu_seqlens_k, k.shape[0])
    visible = seq_q[:, None] == seq_k[None, :]
    if causal:  # bottom-right per sequence: key j of the row's sequence iff j <= i + Sk_b - Sq_b
        visible = visible & (pos_k[None, :] <= pos_q[:, None] + (len_k[None, :] - len_q[:, None]))
    active = active_heads(head_chain, seq_chains, q.device)
    if active is not None:
        active = active[:, 0][seq_q][None]  # (1, total_q, H): each row's sequence's heads
    return attend(q[None], k[None], v[None], kv_head_index, visible[None], active, softmax_scale)[0]
