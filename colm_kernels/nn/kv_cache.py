"""A preallocated KV cache in the layout ``chain_attention`` reads: ``(B, max_len, n_kv, hd)``.

Without KV sharing a token computed at scale ``s`` only has the kv heads of chains ``0..s``, so the
cache tracks the smallest scale any cached position was computed at (``complete_chain``) and
refuses a step at a larger scale: its K/V would be incomplete. With KV sharing every kv head comes
from chain 1 and the cache is complete at every scale.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, kv_sharing: bool, dtype=None, device=None):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.kv_sharing = kv_sharing
        self.complete_chain: Optional[int] = None  # None: empty cache
        self._seqlens: Optional[tuple[int, Tensor]] = None  # (end, (B,) int32 tensor of end)

    def check_scale(self, chain: int) -> None:
        if self.kv_sharing or self.complete_chain is None or chain <= self.complete_chain:
            return
        raise ValueError(
            f"chain={chain} needs the kv heads of chains 0..{chain}, but cached positions were "
            f"computed at scale {self.complete_chain}: without kv_sharing the KV cache would be "
            "incomplete"
        )

    def update(self, layer: int, keys: Tensor, values: Tensor, chain: int) -> tuple[Tensor, Tensor]:
        """Write the new tokens' K/V; return every cached position's K/V for this scale."""
        self.check_scale(chain)
        seqlen, heads = keys.shape[1], keys.shape[2]
        end = self.length + seqlen
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer][:, self.length:end, :heads] = keys
        self.v[layer][:, self.length:end, :heads] = values
        return self.k[layer][:, :end, :heads], self.v[layer][:, :end, :heads]

    def layer_cache(self, layer: int, seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(k, v, cache_seqlens)`` for a decode step of ``seqlen`` new tokens, after ``update``:
        the layer's whole ``(B, max_len, n_kv, hd)`` tensors and the ``(B,)`` int32 lengths
        (``length + seqlen`` for every sequence; one tensor per step, shared by the layers)."""
        end = self.length + seqlen
        if self._seqlens is None or self._seqlens[0] != end:
            k = self.k[layer]
            self._seqlens = (end, torch.full((k.shape[0],), end, dtype=torch.int32, device=k.device))
        return self.k[layer], self.v[layer], self._seqlens[1]

    def advance(self, seqlen: int, chain: int) -> None:
        """Called once per model step, after every layer has written its K/V."""
        self.length += seqlen
        if not self.kv_sharing:
            self.complete_chain = chain if self.complete_chain is None else min(self.complete_chain, chain)
