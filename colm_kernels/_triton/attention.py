"""Device-side (``@triton.jit``) helpers shared by the attention kernels (training and decode).

- ``NOT_A_CHAIN``: the ``tl.constexpr`` padding of chain tables (never <= a sequence's chain).
- ``active_members``: how many query heads of a kv head's packed group are active for a sequence.

Host-side packing (the tables these read) lives in ``colm_kernels.ops.chain_attention.heads``, a
floor above: nothing here imports it.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["NOT_A_CHAIN", "active_members"]

NOT_A_CHAIN = tl.constexpr(2**30)  # padding of chain tables: never <= a sequence's chain


@triton.jit
def active_members(SC, CHAINS, b, g, G: tl.constexpr, G_P2: tl.constexpr, HAS_SC: tl.constexpr):
    """A: how many of kv head g's G query heads are active for sequence b (a prefix: members are
    sorted by chain). Without ``seq_chains`` every member is (A = G)."""
    if HAS_SC:
        sc = tl.load(SC + b).to(tl.int32)
        m = tl.arange(0, G_P2)
        ch = tl.load(CHAINS + g * G + m, mask=m < G, other=NOT_A_CHAIN)
        n = tl.sum((ch <= sc).to(tl.int32), axis=0)
    else:
        n = G
    return n
