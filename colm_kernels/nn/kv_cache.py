"""A preallocated KV cache for ``ChainAttention``: contiguous ``(B, max_len, n_kv, hd)`` per layer,
or paged (``page_size=...``) in flash-attn's ``block_table`` layout.

Without KV sharing a token computed at scale ``s`` only has the kv heads of chains ``0..s``, so the
cache tracks, per sequence, the smallest scale any of its cached positions was computed at and
refuses a step that needs more: its K/V would be incomplete. Steps at one scale for the whole
batch (an int ``chain``) are tracked on the host (``complete_chain``, no sync); once a step has
per-sequence scales (``seq_chains``) the cache also keeps a ``(B,)`` tensor (``seq_complete``),
and checking a step against it costs one host sync per step (not per layer). With KV sharing every
kv head comes from chain 1 and the cache is complete at every scale.

Paged: each layer holds ``(num_blocks, page_size, n_kv, hd)`` pools and one int32 ``block_table
(B, cdiv(max_len, page_size))`` names the block of every page of every sequence; position ``t`` of
sequence ``b`` lives at ``[block_table[b, t // page_size], t % page_size]``. Pages are handed out
position-major (page ``j`` of sequence ``b`` is block ``j * B + b``), as an allocator serving
sequences in lockstep would, so no sequence's pages are contiguous; ``chain_attention_decode``
reads them through the table.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, kv_sharing: bool, dtype=None, device=None, page_size: Optional[int] = None):
        if page_size is None:
            shape = (batch, max_len, n_kv_heads, head_dim)
            self.block_table: Optional[Tensor] = None
        else:
            if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
                raise ValueError(f"page_size must be a positive int or None, got {page_size!r}")
            pages = -(-max_len // page_size)
            shape = (batch * pages, page_size, n_kv_heads, head_dim)
            self.block_table = (torch.arange(batch * pages, dtype=torch.int32, device=device)
                                .view(pages, batch).t().contiguous())
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.page_size = page_size
        self.length = 0
        self.kv_sharing = kv_sharing
        self.complete_chain: Optional[int] = None  # smallest scale of the one-scale steps
        self.seq_complete: Optional[Tensor] = None  # (B,) per sequence, once seq_chains were used
        self._checked: Optional[tuple] = None  # (length, seq_chains, chain) of the step checked last
        self._seqlens: Optional[tuple[int, Tensor]] = None  # (end, (B,) int32 tensor of end)
        self._slots: Optional[tuple[int, Tensor]] = None  # paged: (end, (B, end) pool rows)

    def check_scale(self, chain: int, seq_chains: Optional[Tensor] = None) -> None:
        """Refuse (``ValueError`` naming ``chain``) a step at scale ``chain`` (per sequence:
        ``seq_chains``, ``(B,)``) that needs kv heads some sequence's cached positions lack."""
        if self.kv_sharing or self.length == 0:
            return
        if seq_chains is None and self.seq_complete is None:  # host ints only: no sync
            if chain > self.complete_chain:
                raise ValueError(
                    f"chain={chain} needs the kv heads of chains 0..{chain}, but cached positions "
                    f"were computed at scale {self.complete_chain}: without kv_sharing the KV cache "
                    "would be incomplete"
                )
            return
        checked = self._checked
        if checked is not None and checked[0] == self.length and checked[1] is seq_chains and checked[2] == chain:
            return  # every layer of a step writes: check (and sync) once per step
        have = self.seq_complete
        if have is None:
            have = torch.full(seq_chains.shape, self.complete_chain, device=seq_chains.device)
        need = torch.full_like(have, chain) if seq_chains is None else seq_chains.to(have)
        bad = need > have
        any_bad, b = torch.stack([bad.any().long(), bad.long().argmax()]).tolist()  # the one sync
        if any_bad:
            raise ValueError(
                f"chain={chain if seq_chains is None else 'seq_chains'}: sequence {b} needs the kv "
                f"heads of chains 0..{int(need[b])}, but its cached positions were computed at scale "
                f"{int(have[b])}: without kv_sharing the KV cache would be incomplete"
            )
        self._checked = (self.length, seq_chains, chain)

    def _rows(self, end: int) -> Tensor:
        """Paged: ``(B, end)`` int64 rows of the ``(num_blocks * page_size, n_kv, hd)`` view of a
        pool that hold positions ``[0, end)`` of every sequence (the same for every layer of a
        step, so computed once per step)."""
        if self._slots is None or self._slots[0] != end:
            pos = torch.arange(end, device=self.block_table.device)
            blocks = self.block_table[:, pos // self.page_size].long()
            self._slots = (end, blocks * self.page_size + pos % self.page_size)
        return self._slots[1]

    def write(self, layer: int, keys: Tensor, values: Tensor, chain: int,
              seq_chains: Optional[Tensor] = None) -> None:
        """Write the new tokens' K/V ``(B, seqlen, heads, hd)`` at positions ``[length, length +
        seqlen)`` of layer ``layer`` (``heads``: the kv heads that exist at scale ``chain``;
        ``seq_chains``: the step's per-sequence scales, whose kv heads beyond them are zeros)."""
        self.check_scale(chain, seq_chains)
        seqlen, heads = keys.shape[1], keys.shape[2]
        end = self.length + seqlen
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        k, v = self.k[layer], self.v[layer]
        if self.block_table is None:
            k[:, self.length:end, :heads] = keys
            v[:, self.length:end, :heads] = values
        else:
            new = self._rows(end)[:, self.length:]
            k.flatten(0, 1)[new, :heads] = keys
            v.flatten(0, 1)[new, :heads] = values

    def update(self, layer: int, keys: Tensor, values: Tensor, chain: int,
               seq_chains: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``write``, then every cached position's K/V for this scale, ``(B, end, heads, hd)``:
        views of a contiguous cache, a gathered copy of a paged one (``chain_attention``'s input;
        a decode step reads the cache in place through ``layer_cache`` instead)."""
        self.write(layer, keys, values, chain, seq_chains)
        end, heads = self.length + keys.shape[1], keys.shape[2]
        k, v = self.k[layer], self.v[layer]
        if self.block_table is None:
            return k[:, :end, :heads], v[:, :end, :heads]
        rows = self._rows(end)
        return k.flatten(0, 1)[rows, :heads], v.flatten(0, 1)[rows, :heads]

    def layer_cache(self, layer: int, seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(k, v, cache_seqlens)`` for a decode step of ``seqlen`` new tokens, after ``update``:
        the layer's whole cache tensors (``(B, max_len, n_kv, hd)``, or the paged pools, read
        through ``block_table``) and the ``(B,)`` int32 lengths (``length + seqlen`` for every
        sequence; one tensor per step, shared by the layers)."""
        end = self.length + seqlen
        if self._seqlens is None or self._seqlens[0] != end:
            k = self.k[layer]
            batch = k.shape[0] if self.block_table is None else self.block_table.shape[0]
            self._seqlens = (end, torch.full((batch,), end, dtype=torch.int32, device=k.device))
        return self.k[layer], self.v[layer], self._seqlens[1]

    def pool_rows(self, seq: Tensor, pos: Tensor) -> Tensor:
        """Rows of the ``(B * max_len | num_blocks * page_size, n_kv, hd)`` view of a layer's
        buffers that hold position ``pos`` of sequence ``seq`` (int64, broadcast together)."""
        seq, pos = seq.long(), pos.long()
        if self.block_table is None:
            return seq * self.max_len + pos
        return self.block_table[seq, pos // self.page_size].long() * self.page_size + pos % self.page_size

    def scatter(self, layer: int, keys: Tensor, values: Tensor, seq: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Ragged write (``models.ragged``): packed K/V ``(T, heads, hd)``, token ``t`` at position
        ``pos[t]`` of sequence ``seq[t]``; returns the layer's whole buffers. The caller keeps the
        per-sequence lengths and checks completeness (``generate`` plans both before any step)."""
        rows = self.pool_rows(seq, pos)
        heads = keys.shape[1]
        k, v = self.k[layer], self.v[layer]
        k.flatten(0, 1)[rows, :heads] = keys
        v.flatten(0, 1)[rows, :heads] = values
        return k, v

    def advance(self, seqlen: int, chain: int, seq_chains: Optional[Tensor] = None) -> None:
        """Called once per model step, after every layer has written its K/V (``seq_chains``:
        the step's per-sequence scales, if it had them)."""
        self.length += seqlen
        if self.kv_sharing:
            return
        if seq_chains is None:
            self.complete_chain = chain if self.complete_chain is None else min(self.complete_chain, chain)
            if self.seq_complete is not None:
                self.seq_complete = self.seq_complete.clamp_max(chain)
            return
        seq = seq_chains.to(torch.int64)
        if self.seq_complete is not None:
            self.seq_complete = torch.minimum(self.seq_complete, seq)
        else:
            self.seq_complete = seq.clone() if self.complete_chain is None else seq.clamp_max(self.complete_chain)
