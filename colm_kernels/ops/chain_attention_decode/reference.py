"""KV-cache decode attention in plain PyTorch: one sequence at a time, over its valid cache prefix.

``q``: ``(B, Sq, Hq, D)``, the new tokens (already written into the cache). The cache is
contiguous, ``k_cache``, ``v_cache`` ``(B, S_max, Hkv_cache, D)``, or paged (``block_table``
given, flash-attn's convention): ``(num_blocks, page_size, Hkv_cache, D)`` with an int32
``block_table (B, max_blocks)``, key ``j`` of sequence ``b`` at ``[block_table[b, j //
page_size], j % page_size]``. ``cache_seqlens`` ``(B,)``: valid length of each sequence, the
``Sq`` new tokens included. Sequence ``b`` is ``chain_attention``'s reference math
(``ops/chain_attention/reference.py``) on its first ``L_b`` keys, causal bottom-right: query ``i``
sees keys ``j < L_b - Sq + i + 1`` (a row that sees no key outputs zeros); every sequence runs at
the cache's capacity under that mask. Positions at or past
``L_b``, pages past them and kv heads that ``kv_head_index`` does not name are never read (they
may hold NaN). Any dtype; scores and softmax in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..chain_attention.reference import active_heads, attend


def cache_kv(k_cache: Tensor, v_cache: Tensor, block_table: Optional[Tensor]):
    """Every sequence's keys and values at positions ``0 .. capacity - 1``, ``(B, capacity,
    Hkv_cache, D)`` each: the contiguous cache itself, or its pages gathered from a paged one (a
    table entry past a sequence's pages may name no block: clamped, its keys masked by the
    length)."""
    if block_table is None:
        return k_cache, v_cache
    blocks = block_table.long().clamp(0, k_cache.shape[0] - 1)
    return tuple(c[blocks].flatten(1, 2) for c in (k_cache, v_cache))


def chain_attention_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    kv_head_index: Sequence[int],
    head_chain: Sequence[int],
    seq_chains: Optional[Tensor],
    softmax_scale: float,
    block_table: Optional[Tensor] = None,
) -> Tensor:
    """No host sync: the lengths only build the masks."""
    k, v = cache_kv(k_cache, v_cache, block_table)
    sq, capacity = q.shape[1], k.shape[1]
    lengths = cache_seqlens.long().clamp(0, capacity)[:, None, None]  # (B, 1, 1)
    i = torch.arange(sq, device=q.device)[None, :, None]
    j = torch.arange(capacity, device=q.device)[None, None, :]
    visible = (j < lengths) & (j < lengths - sq + i + 1)  # (B, Sq, capacity)
    return attend(q, k, v, kv_head_index, visible, active_heads(head_chain, seq_chains, q.device),
                  softmax_scale, key_ok=j[0] < lengths[:, 0])
