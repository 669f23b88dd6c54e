"""Ragged batches: sequences that do not each fill one row of a ``(B, S)`` token tensor.

A padded batch (an attention mask with zeros), or a batch whose rows have cached different numbers
of tokens (a KV cache filled from a left-padded prompt), is computed exactly as if every sequence
were alone: masked tokens are dropped, every remaining token gets its own RoPE position, and
attention runs per sequence through the kernels' own ragged layouts, never through an additive mask:

- no cached tokens: ``chain_attention`` on ``(B, S)`` when every row is full, else its varlen form
  (``cu_seqlens``) over the packed tokens;
- cached tokens: the new K/V are written at each sequence's own cache length, then
  ``chain_attention_decode`` reads the cache in place with per-sequence ``cache_seqlens`` (every row
  has the same 1..128 new tokens, no gradient; contiguous or paged through ``block_table``), or
  varlen ``chain_attention`` reads the gathered cache (bottom-right causal per sequence).

Everything that is position-wise (norms, FFN, projections) runs on the packed tokens only. Per-
sequence scales (``seq_chains``) ride along: the call runs at the largest scale, each row's
features beyond its own scale are exact zeros (the ops' elastic rows), attention skips the heads of
a sequence's inactive chains.

``CoLM.generate`` and ``integrations.hf`` build on it; nothing here imports a framework.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Protocol

import torch
from torch import Tensor

from ..chains import Chains
from ..nn import ChainAttention, KVCache
from ..nn.rope import apply_rotary, rope_angles
from ..ops.chain_attention.api import chain_attention
from ..ops.chain_attention_decode.api import MAX_DECODE_TOKENS, chain_attention_decode


@dataclasses.dataclass(frozen=True)
class RaggedLayout:
    """Where the tokens of one call go. Sequence ``b`` is row ``b`` of the ``(rows, cols)`` input.

    ``index`` holds the flat positions ``row * cols + col`` of the computed (unmasked) tokens, in
    row-major order; ``None`` when every token is computed (``uniform``). Per token: ``seq_id``
    (its row), ``slot`` (its place in that sequence's cache: cached length + rank among the row's
    new tokens) and ``positions`` (RoPE). Host ints are read once, when the layout is built;
    ``rope_rows`` bounds the positions when known on the host (None: read off ``positions``).
    """

    rows: int
    cols: int
    index: Optional[Tensor]
    seq_id: Tensor
    slot: Tensor
    positions: Tensor
    new_lens: Tensor   # (rows,) int32
    past_lens: Tensor  # (rows,) int32
    n_tokens: int      # new tokens in all
    max_new: int
    max_total: int     # longest sequence, cached + new
    total_keys: int    # cached + new tokens in all
    rope_rows: Optional[int] = None

    @property
    def uniform(self) -> bool:
        """Every row holds ``cols`` new tokens: the ``(B, S)`` layout works as is."""
        return self.index is None

    @property
    def has_past(self) -> bool:
        return self.total_keys > self.n_tokens


def ragged_layout(rows: int, cols: int, device, valid: Optional[Tensor] = None,
                  past_lens: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> RaggedLayout:
    """The layout of a ``(rows, cols)`` call. ``valid``: bool ``(rows, cols)`` (False: masked);
    ``past_lens``: int ``(rows,)`` cached tokens per row; ``positions``: ``(rows, cols)`` RoPE
    positions (default: each token's place in its own sequence, cached tokens included)."""
    past = (torch.zeros(rows, dtype=torch.int32, device=device) if past_lens is None
            else past_lens.to(device=device, dtype=torch.int32))
    if valid is not None and bool(valid.all()):
        valid = None
    if valid is None:
        index = None
        seq_id = torch.arange(rows, device=device).repeat_interleave(cols)
        rank = torch.arange(cols, device=device).repeat(rows)
        new_lens = torch.full((rows,), cols, dtype=torch.int32, device=device)
    else:
        index = valid.reshape(-1).nonzero().squeeze(1)
        seq_id = index // cols
        rank = (valid.long().cumsum(1) - 1).reshape(-1)[index]
        new_lens = valid.sum(1, dtype=torch.int32)
    slot = past.long()[seq_id] + rank
    if positions is None:
        pos = slot
    else:
        pos = positions.reshape(-1).long()
        pos = pos if index is None else pos[index]
    total = past + new_lens
    n_tokens, max_new, max_total, total_keys = torch.stack(
        [new_lens.sum(), new_lens.max(), total.max(), total.sum()]).tolist()  # the one host sync
    return RaggedLayout(rows, cols, index, seq_id, slot, pos, new_lens, past, int(n_tokens),
                        int(max_new), int(max_total), int(total_keys),
                        rope_rows=int(max_total) if positions is None else None)


def decode_layout(past_lens: Tensor, cols: int, max_past: int, sum_past: int) -> RaggedLayout:
    """The layout of a decode step: every sequence gets ``cols`` new tokens after its
    ``past_lens`` cached ones, whose largest and total the caller knows on the host (a decode loop
    counts them), so building it costs no host sync."""
    rows, device = past_lens.shape[0], past_lens.device
    past = past_lens.to(torch.int32)
    seq_id = torch.arange(rows, device=device).repeat_interleave(cols)
    slot = past.long()[seq_id] + torch.arange(cols, device=device).repeat(rows)
    new_lens = torch.full((rows,), cols, dtype=torch.int32, device=device)
    return RaggedLayout(rows, cols, None, seq_id, slot, slot, new_lens, past, rows * cols, cols,
                        max_past + cols, sum_past + rows * cols, rope_rows=max_past + cols)


class RaggedCache(Protocol):
    """What ``ragged_attention`` needs of a KV cache (``integrations.hf.CoLMCache`` and
    ``PackedKVCache`` are two). A paged cache also has ``block_table`` and ``pool_rows(seq, pos)``
    (as ``nn.KVCache``); without them the buffers are ``(rows, capacity, heads, hd)``."""

    def write(self, layer: int, keys: Tensor, values: Tensor, layout: RaggedLayout,
              chain: int) -> tuple[Tensor, Tensor]:
        """Store the packed new ``keys``/``values`` ``(T, heads, hd)`` at ``(layout.seq_id,
        layout.slot)``; return the layer's whole buffers."""


class PackedKVCache:
    """An ``nn.KVCache`` (contiguous or paged) written through ragged layouts: each sequence's
    tokens from slot 0 on, its own length kept by the caller (``CoLM.generate``, which also checks
    every step's scales against what the cache holds before the first step)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.block_table = cache.block_table
        self.pool_rows = cache.pool_rows

    def write(self, layer: int, keys: Tensor, values: Tensor, layout: RaggedLayout,
              chain: int) -> tuple[Tensor, Tensor]:
        if layout.max_total > self.cache.max_len:
            raise ValueError(f"KV cache overflow: {layout.max_total} positions > max_len={self.cache.max_len}")
        return self.cache.scatter(layer, keys, values, layout.seq_id, layout.slot)


def rope_table(head_dim: int, positions: Tensor, theta: float, rows: Optional[int] = None) -> Tensor:
    """``(T, head_dim // 2)`` angles for arbitrary positions: rows of the same float64 table that
    ``ChainAttention`` builds for contiguous positions, so every angle is bit-identical to it.
    ``rows``: a bound on the positions known on the host (None: one sync reads their maximum)."""
    if positions.numel() == 0:
        return rope_angles(head_dim, 0, 0, theta, positions.device)
    if rows is None:
        rows = int(positions.max()) + 1
    return rope_angles(head_dim, 0, rows, theta, positions.device)[positions]


def _cu(lens: Tensor) -> Tensor:
    return torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))


def _rotate(x: Tensor, angles: Tensor, head_dim: int) -> Tensor:
    """``(..., H * hd)`` token-major -> ``(T, H, hd)`` rotated by each token's own angles."""
    tokens = x.reshape(1, -1, x.shape[-1] // head_dim, head_dim)
    return apply_rotary(tokens, angles).squeeze(0)


def _gathered_rows(cache, k_buf: Tensor, owner: Tensor, within: Tensor) -> Tensor:
    """Rows of ``k_buf.flatten(0, 1)`` holding key ``within`` of sequence ``owner``."""
    pool_rows = getattr(cache, "pool_rows", None)
    if pool_rows is None:  # (rows, capacity, heads, hd)
        return owner * k_buf.shape[1] + within
    return pool_rows(owner, within)


def ragged_attention(attn: ChainAttention, x: Tensor, chain: int, layout: RaggedLayout,
                     angles: Tensor, cache: Optional[RaggedCache] = None, layer: int = 0, *,
                     seq_chains: Optional[Tensor] = None, row_chains: Optional[Tensor] = None) -> Tensor:
    """``attn``'s output for the normed input ``x`` (``(B, S, P)`` when ``layout.uniform``, else
    ``(1, T, P)`` packed), each sequence attending only to its own (cached and new) tokens.

    ``seq_chains``: optional ``(B,)`` scale of each sequence (at most ``chain``, trusted: the
    caller checked it), ``row_chains`` the same per row of ``x`` (``seq_chains[seq_id]``)."""
    hd = attn.head_dim
    rows = dict(seq_chains=row_chains, check_values=False)
    q = _rotate(attn.wq(x, chain, **rows), angles, hd)
    keys, values = attn.project_kv(x, chain, **rows)
    keys = _rotate(keys, angles, hd)
    values = values.reshape(keys.shape)
    options = dict(kv_sharing=attn.kv_sharing, kv_mapping=attn.kv_mapping, seq_chains=seq_chains,
                   check_values=False)
    B, S, heads = layout.rows, layout.cols, keys.shape[1]
    if cache is not None:
        k_buf, v_buf = cache.write(layer, keys, values, layout, chain)
    if cache is None or not layout.has_past:
        if layout.uniform:
            out = chain_attention(q.view(B, S, -1, hd), keys.view(B, S, -1, hd), values.view(B, S, -1, hd),
                                  attn.chains, causal=True, **options).flatten(0, 1)
        else:
            cu = _cu(layout.new_lens)
            out = chain_attention(q, keys, values, attn.chains, causal=True, cu_seqlens_q=cu,
                                  cu_seqlens_k=cu, max_seqlen_q=layout.max_new,
                                  max_seqlen_k=layout.max_new, **options)
    elif (layout.uniform and S <= MAX_DECODE_TOKENS
          and not (torch.is_grad_enabled() and (q.requires_grad or k_buf.requires_grad))):
        # Without KV sharing the buffers may hold more kv heads than this scale reads: the decode
        # op then sees the prefix chains' model, whose kv heads are exactly the first ``heads``.
        chains = attn.chains if attn.kv_sharing else Chains(attn.chains.sizes[: chain + 1])
        seqlens = layout.past_lens + layout.new_lens
        out = chain_attention_decode(q.view(B, S, -1, hd), k_buf[:, :, :heads], v_buf[:, :, :heads],
                                     seqlens, chains, block_table=getattr(cache, "block_table", None),
                                     **options).flatten(0, 1)
    else:
        total = layout.past_lens + layout.new_lens
        cu_k = _cu(total)
        owner = torch.arange(B, device=x.device).repeat_interleave(total.long(), output_size=layout.total_keys)
        within = torch.arange(layout.total_keys, device=x.device) - cu_k.long()[owner]
        flat = _gathered_rows(cache, k_buf, owner, within)
        k_all = k_buf.flatten(0, 1)[flat][:, :heads]
        v_all = v_buf.flatten(0, 1)[flat][:, :heads]
        out = chain_attention(q, k_all, v_all, attn.chains, causal=True,
                              cu_seqlens_q=_cu(layout.new_lens), cu_seqlens_k=cu_k,
                              max_seqlen_q=layout.max_new, max_seqlen_k=layout.max_total, **options)
    return attn.wo(out.flatten(-2).reshape(*x.shape[:-1], -1), chain, **rows)


def ragged_hidden(model, tokens: Tensor, chain: int, layout: RaggedLayout,
                  cache: Optional[RaggedCache] = None, *, seq_chains: Optional[Tensor] = None) -> Tensor:
    """Final normed hidden states ``(rows, cols, P_(chain+1))`` of a ``models.CoLM`` for
    ``tokens`` laid out by ``layout`` (masked tokens come back as zeros). Every block runs through
    its ``__call__`` with ``ragged_attention`` as its attention (FSDP / checkpoint wrappers fire).

    ``seq_chains``: optional ``(rows,)`` per-sequence scales, at most ``chain`` (trusted: checked
    by the caller); a sequence's features beyond its scale come back as exact zeros."""
    cfg = model.config
    width = model.chains.active_width(cfg.dim, chain)
    flat = tokens.reshape(-1) if layout.uniform else tokens.reshape(-1)[layout.index]
    h = model.tok_embeddings(flat)[..., :width]
    h = h.view(layout.rows, layout.cols, width) if layout.uniform else h.unsqueeze(0)
    row_chains = None
    if seq_chains is not None:  # one scale per row of h: (B,) covers (B, S); packed rows need theirs
        row_chains = seq_chains if layout.uniform else seq_chains[layout.seq_id].unsqueeze(0)
    angles = rope_table(cfg.head_dim, layout.positions, cfg.rope_theta, layout.rope_rows)
    for i, block in enumerate(model.layers):
        attend = functools.partial(_attend, layout=layout, angles=angles, cache=cache, layer=i,
                                   seq_chains=seq_chains, row_chains=row_chains)
        h = block(h, chain, attend=attend, seq_chains=row_chains, check_values=False)
    h = model.norm(h, chain, seq_chains=row_chains, check_values=False)
    if layout.uniform:
        return h
    out = h.new_zeros(layout.rows * layout.cols, width).index_copy(0, layout.index, h[0])
    return out.view(layout.rows, layout.cols, width)


def _attend(attn, x, chain, *, layout, angles, cache, layer, seq_chains, row_chains):
    return ragged_attention(attn, x, chain, layout, angles, cache, layer, seq_chains=seq_chains,
                            row_chains=row_chains)
