"""KV-cache decode attention: thin launcher over the CUDA extension (``csrc/chain_attention_decode``).

Math: ``reference.chain_attention_decode`` (split-K flash-decoding, fp32 math, one rounding to the
output dtype). Contracts (all tensors on one CUDA device):

- ``q`` ``(B, Sq, Hq, D)``, ``1 <= Sq <= MAX_DECODE_TOKENS``; ``k_cache``, ``v_cache`` ``(B,
  S_max, Hkv_cache, D)`` or, with ``block_table`` (int32 ``(B, max_blocks)``), paged ``(num_blocks,
  page_size, Hkv_cache, D)``, in q's dtype (float32, float16 or bfloat16), any strides that are
  multiples of 16 bytes with a unit last stride and a 16-byte aligned start (read in place with
  16-byte vector loads); ``D`` in ``DECODE_HEAD_DIMS`` (multiples of 8 up to 256: whole 16-byte
  vectors; the kernels are compiled for the padded power of two).
- ``cache_seqlens`` / ``seq_chains``: integer ``(B,)`` (converted to int32).
- ``kv_head_index`` / ``head_chain``: one int per query head (``api.decode_head_maps``); every kv
  head ``0 .. max(kv_head_index)`` serves the same number of query heads.
- returns ``out (B, Sq, Hq, D)`` contiguous in q's dtype. ``num_splits`` forces the number of
  splits of the key axis (tests); by default the extension picks it from ``S_max`` and the SM count.

The per-kv-head tables live on the device, cached on their content (``colm_kernels._tables.int32_table``,
the Triton kernels' cache). The extension is loaded on first call; ``RuntimeError`` with the reason
when it cannot be used.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..._cuda import require_extension
from ..chain_attention.heads import group_rows


def _int32(t: torch.Tensor) -> torch.Tensor:
    return (t if t.dtype == torch.int32 else t.to(torch.int32)).contiguous()


def chain_attention_decode_fwd(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    kv_head_index: Sequence[int], head_chain: Sequence[int], seq_chains: Optional[torch.Tensor],
    softmax_scale: float, block_table: Optional[torch.Tensor] = None, *, num_splits: Optional[int] = None,
) -> torch.Tensor:
    ext = require_extension()
    # Imported here, not at module level: importing this module (the backend's reasons) needs no
    # triton; the launch shares the device-table cache of the Triton kernels.
    from ..._tables import int32_table

    kv = tuple(int(i) for i in kv_head_index)
    hc = tuple(int(c) for c in head_chain)
    heads, chains = group_rows(kv, hc)
    if len({len(h) for h in heads}) != 1:
        raise ValueError(f"every kv head must serve the same number of query heads, got kv_head_index={list(kv)}")
    if q.shape[-1] > 1 and q.stride(-1) != 1:
        q = q.contiguous()
    dev = q.device
    return ext.chain_attention_decode_fwd(
        q, k_cache, v_cache, _int32(cache_seqlens), int32_table(heads, dev), int32_table(chains, dev),
        int32_table((hc,), dev), None if seq_chains is None else _int32(seq_chains),
        float(softmax_scale), int(num_splits or 0), None if block_table is None else _int32(block_table),
    )


def chain_attention_decode_fake(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains,
                                softmax_scale, block_table=None) -> torch.Tensor:
    """Output of ``chain_attention_decode_fwd`` with the right shape and dtype, no data."""
    return q.new_empty(q.shape)


def alignment_reasons(k_cache: torch.Tensor, v_cache: torch.Tensor) -> list[str]:
    """The vector loads need 16-byte aligned rows. Read off strides and storage offsets (so this
    also works on fake tensors); the allocation itself is assumed 16-byte aligned (the launcher
    checks the real pointer)."""
    reasons = []
    vec = max(1, 16 // k_cache.element_size())
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        bad = [s for s in t.stride()[:3] if s % vec] + ([t.storage_offset()] if t.storage_offset() % vec else [])
        if bad:
            reasons.append(f"cuda chain_attention_decode reads {name} with 16-byte vector loads: its strides "
                           f"{tuple(t.stride())} and storage offset {t.storage_offset()} must be multiples of "
                           f"{vec} elements")
    return reasons
