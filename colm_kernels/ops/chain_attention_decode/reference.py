"""KV-cache decode attention in plain PyTorch: one sequence at a time, over its valid cache prefix.

``q``: ``(B, Sq, Hq, D)``, the new tokens (already written into the cache). The cache is
contiguous, ``k_cache``, ``v_cache`` ``(B, S_max, Hkv_cache, D)``, or paged (``block_table``
given, flash-attn's convention): ``(num_blocks, page_size, Hkv_cache, D)`` with an int32
``block_table (B, max_blocks)``, key ``j`` of sequence ``b`` at ``[block_table[b, j //
page_size], j % page_size]``. ``cache_seqlens`` ``(B,)``: valid length of each sequence, the
``Sq`` new tokens included. Sequence ``b`` is ``chain_attention``'s reference math
(``ops/chain_attention/reference.py``) on its first ``L_b`` keys, causal bottom-right: query ``i``
sees keys ``j < L_b - Sq + i + 1`` (a row that sees no key outputs zeros). Positions at or past
``L_b``, pages past them and kv heads that ``kv_head_index`` does not name are never read (they
may hold NaN). Any dtype; scores and softmax in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..chain_attention.reference import chain_attention


def sequence_kv(k_cache: Tensor, v_cache: Tensor, block_table: Optional[Tensor], b: int, n: int):
    """The first ``n`` keys and values of sequence ``b``, ``(1, n, Hkv_cache, D)`` each: a view of
    a contiguous cache, or its pages gathered from a paged one."""
    if block_table is None:
        return k_cache[b:b + 1, :n], v_cache[b:b + 1, :n]
    page = k_cache.shape[1]
    blocks = block_table[b, :(n + page - 1) // page].long()
    return (k_cache[blocks].flatten(0, 1)[None, :n], v_cache[blocks].flatten(0, 1)[None, :n])


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
    capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
    lengths = [int(n) for n in cache_seqlens.tolist()]
    outs = []
    for b, n in enumerate(lengths):
        k, v = sequence_kv(k_cache, v_cache, block_table, b, max(0, min(n, capacity)))
        outs.append(chain_attention(
            q[b:b + 1], k, v, kv_head_index, head_chain,
            True, None if seq_chains is None else seq_chains[b:b + 1], softmax_scale,
        ))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, dim=0)
