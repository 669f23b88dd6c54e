"""KV-cache decode attention in plain PyTorch: one sequence at a time, over its valid cache prefix.

``q``: ``(B, Sq, Hq, D)``, the new tokens (already written into the cache); ``k_cache``,
``v_cache``: ``(B, S_max, Hkv_cache, D)``; ``cache_seqlens`` ``(B,)``: valid length of each
sequence, the ``Sq`` new tokens included. Sequence ``b`` is ``chain_attention``'s reference math
(``ops/chain_attention/reference.py``) on ``k_cache[b, :L_b]``, causal bottom-right: query ``i``
sees keys ``j < L_b - Sq + i + 1`` (a row that sees no key outputs zeros). Positions at or past
``L_b`` and kv heads that ``kv_head_index`` does not name are never read (they may hold NaN).
Any dtype; scores and softmax in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..chain_attention.reference import chain_attention


def chain_attention_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    kv_head_index: Sequence[int],
    head_chain: Sequence[int],
    seq_chains: Optional[Tensor],
    softmax_scale: float,
) -> Tensor:
    lengths = [int(n) for n in cache_seqlens.tolist()]
    outs = []
    for b, n in enumerate(lengths):
        n = max(0, min(n, k_cache.shape[1]))
        outs.append(chain_attention(
            q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], kv_head_index, head_chain,
            True, None if seq_chains is None else seq_chains[b:b + 1], softmax_scale,
        ))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, dim=0)
