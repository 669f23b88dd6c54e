"""Launchers of the chain-attention kernels (``triton_kernels``): output allocation, the packed
kv-head group tables, grids and strides. Inputs are validated by ``api.py`` (the public op) and
the backend's ``not_supported_reasons``; these functions trust them.

- ``chain_attention_fwd``: ``(out, lse)`` of the forward kernel.
- ``chain_attention_bwd``: ``(dq, dk, dv)``: delta preprocess, the key-block pass (dK/dV, and dQ
  by atomics unless ``deterministic``), and the dQ pass where needed.
- ``fwd_out_shapes`` (the fake uses it too) and ``group_layout``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton

from colm_kernels._triton.device import device_guard, last_dim_contiguous, small_tiles
from colm_kernels._triton.tables import int32_table
from colm_kernels._triton.tma import ensure_tma_allocator, strides_tma_aligned, tma_launch_guard
from colm_kernels.ops.chain_attention.heads import LOG2E, group_rows
from colm_kernels.ops.chain_attention.triton_kernels import (
    _chain_attention_bwd_dq_kernel,
    _chain_attention_bwd_kernel,
    _chain_attention_bwd_preprocess_kernel,
    _chain_attention_fwd_kernel,
)
from colm_kernels.ops.chain_attention.triton_tiles import head_dim_p2, stride_alignment

__all__ = ["chain_attention_fwd", "chain_attention_bwd", "fwd_out_shapes", "group_layout"]

_MAX_GRID_Y = 65535


# ----------------------------------------------------------------------------------------------
# Launcher helpers
# ----------------------------------------------------------------------------------------------
def fwd_out_shapes(q: torch.Tensor, varlen: bool = False) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Shapes of ``(out, lse)``: ``(B, Sq, Hq, D)`` and ``(B, Hq, Sq)``; varlen ``(total_q, Hq, D)``
    and ``(Hq, total_q)`` (the fake uses this too)."""
    if varlen:
        total_q, Hq, _ = q.shape
        return tuple(q.shape), (Hq, total_q)
    B, Sq, Hq, _ = q.shape
    return tuple(q.shape), (B, Hq, Sq)


def group_layout(kv_head_index: Sequence[int], head_chain: Sequence[int], n_kv: int, device):
    """``(HEADS, CHAINS, G)``: int32 ``(Hkv, G)`` tables of each kv head's query heads (sorted by
    ``(chain, head)``) and their chains."""
    heads, chains = group_rows(kv_head_index, head_chain, n_kv)
    return int32_table(heads, device), int32_table(chains, device), len(heads[0])


def _bsh(t: torch.Tensor, varlen: bool, align: int = 1) -> Tuple[int, int, int]:
    """(batch, position, head) strides in units of ``align`` elements (``hint_strides``); a packed
    varlen tensor has no batch dim (stride 0: the kernels offset by the sequence's first row)."""
    strides = (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))
    return tuple(st // align for st in strides)


def _geometry(q, k, varlen, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """``(B, Sq, Sk, Hq, Hkv, (stride_lb, stride_lh))`` of a launch. Varlen: B is n_seq and Sq / Sk
    the max lengths (grid bounds; the kernels read each sequence's own from cu_seqlens); lse and
    delta are ``(Hq, total_q)``."""
    if varlen:
        B, Sq, Sk, Hq, Hkv = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, q.shape[1], k.shape[1]
        return B, Sq, Sk, Hq, Hkv, (0, q.shape[0])
    B, Sq, Hq, _ = q.shape
    return B, Sq, k.shape[1], Hq, k.shape[2], (Hq * Sq, Sq)


def _common(q, k, kv_head_index, head_chain, seq_chains, cu_seqlens_q, cu_seqlens_k, B, Hkv, varlen):
    if B * Hkv > _MAX_GRID_Y:
        raise ValueError(f"batch * kv heads = {B * Hkv} exceeds {_MAX_GRID_Y} (grid limit)")
    heads, chains, G = group_layout(kv_head_index, head_chain, Hkv, q.device)
    has_sc = seq_chains is not None
    sc = seq_chains.contiguous() if has_sc else heads  # any int tensor when unused
    cu_q = cu_seqlens_q.contiguous() if varlen else heads
    cu_k = cu_seqlens_k.contiguous() if varlen else heads
    meta = dict(HEAD_DIM=q.shape[-1], HEAD_DIM_P2=head_dim_p2(q.shape[-1]), G=G,
                G_P2=max(2, triton.next_power_of_2(G)), HAS_SC=has_sc, VARLEN=varlen)
    return heads, chains, sc, cu_q, cu_k, meta


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def chain_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_head_index: Sequence[int], head_chain: Sequence[int], causal: bool,
    seq_chains: Optional[torch.Tensor], softmax_scale: float,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``(B, Sq, Hq, D)`` contiguous in q's dtype, lse fp32 ``(B, Hq, Sq)``
    (log2 units; +inf for rows with no visible key and for inactive heads). Varlen (``cu_seqlens_*``
    given): out ``(total_q, Hq, D)``, lse ``(Hq, total_q)``."""
    varlen = cu_seqlens_q is not None
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out_shape, lse_shape = fwd_out_shapes(q, varlen)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    B, Sq, Sk, Hq, Hkv, lse_strides = _geometry(q, k, varlen, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if out.numel() == 0 or Sq == 0:
        return out, lse
    heads, chains, sc, cu_q, cu_k, meta = _common(q, k, kv_head_index, head_chain, seq_chains,
                                                  cu_seqlens_q, cu_seqlens_k, B, Hkv, varlen)
    G = meta["G"]

    def grid(m):
        return (triton.cdiv(G * Sq, m["BLOCK_M"]), B * Hkv)

    align = stride_alignment(q, k, v, out)
    with tma_launch_guard(q.device):
        _chain_attention_fwd_kernel[grid](
            q, k, v, out, lse, heads, chains, sc, cu_q, cu_k,
            *_bsh(q, varlen, align), *_bsh(k, varlen, align), *_bsh(v, varlen, align),
            *_bsh(out, varlen, align), *lse_strides,
            Sq, Sk, Hkv, float(softmax_scale) * LOG2E,
            CAUSAL=bool(causal), ALIGN=align, TMA_KV=strides_tma_aligned(k, v), **meta,
        )
    return out, lse


def chain_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    kv_head_index: Sequence[int], head_chain: Sequence[int], causal: bool,
    seq_chains: Optional[torch.Tensor], softmax_scale: float,
    need_dq: bool = True, need_dkv: bool = True,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, deterministic: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype. ``out``/``lse`` from the forward.
    ``need_dq`` / ``need_dkv`` False: that gradient is not computed and is None.

    dQ and dK/dV together: one pass over the key blocks adds dQ by fp32 atomics (5 matmuls per
    tile; the order of the additions varies run to run on a GPU), or with ``deterministic`` a
    separate dQ pass that recomputes S and dP (7 matmuls per tile, bitwise reproducible)."""
    varlen = cu_seqlens_q is not None
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    dout = dout.to(q.dtype)
    lse = lse.contiguous()
    atomic_dq = need_dq and need_dkv and not deterministic
    if atomic_dq:  # fp32 sums of every key block's share; cast once at the end
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if need_dq else None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if need_dkv else None
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if need_dkv else None
    B, Sq, Sk, Hq, Hkv, lse_strides = _geometry(q, k, varlen, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if q.numel() == 0 or k.numel() == 0 or not (need_dq or need_dkv):  # nothing attends: zeros
        dq = None if dq is None else dq.zero_().to(q.dtype)
        return tuple(None if t is None else t.zero_() for t in (dq, dk, dv))
    heads, chains, sc, cu_q, cu_k, meta = _common(q, k, kv_head_index, head_chain, seq_chains,
                                                  cu_seqlens_q, cu_seqlens_k, B, Hkv, varlen)
    G = meta["G"]
    qk_scale = float(softmax_scale) * LOG2E
    delta = torch.empty_like(lse)
    align = stride_alignment(q, k, v, out, dout, *(t for t in (dq, dk, dv) if t is not None))
    pre_block = 16 if small_tiles() else 64
    with device_guard(q.device):
        if Sq > 0:
            _chain_attention_bwd_preprocess_kernel[(triton.cdiv(G * Sq, pre_block), B * Hkv)](
                out, dout, delta, heads, chains, sc, cu_q,
                *_bsh(out, varlen, align), *_bsh(dout, varlen, align), *lse_strides,
                Sq, Hkv, BLOCK_M=pre_block, num_warps=1 if small_tiles() else 4,
                HEAD_DIM=meta["HEAD_DIM"], HEAD_DIM_P2=meta["HEAD_DIM_P2"], ALIGN=align, G=G,
                G_P2=meta["G_P2"], HAS_SC=meta["HAS_SC"], VARLEN=varlen,
            )
        if need_dkv and Sk > 0:
            # the autotuner zeroes DQ between its benchmark runs: the sum, or a one-element stand-in
            # the kernel never touches (Triton 3.6 zeroes a None argument too, and fails)
            dq_arg = dq if atomic_dq else torch.zeros(1, dtype=torch.float32, device=q.device)
            _chain_attention_bwd_kernel[lambda m: (triton.cdiv(Sk, m["BLOCK_N"]), B * Hkv)](
                q, k, v, dout, lse, delta, dq_arg, dk, dv, heads, chains, sc, cu_q, cu_k,
                *_bsh(q, varlen, align), *_bsh(k, varlen, align), *_bsh(v, varlen, align),
                *_bsh(dout, varlen, align), *_bsh(dq if atomic_dq else q, varlen, align), *_bsh(dk, varlen, align),
                *lse_strides,
                Sq, Sk, Hkv, qk_scale, float(softmax_scale),
                CAUSAL=bool(causal), DQ_ATOMIC=atomic_dq, ALIGN=align, **meta,
            )
        if need_dq and not atomic_dq and Sq > 0:
            ensure_tma_allocator(q.device)  # autograd's backward thread has its own allocator slot
            _chain_attention_bwd_dq_kernel[lambda m: (triton.cdiv(G * Sq, m["BLOCK_M"]), B * Hkv)](
                q, k, v, dout, lse, delta, dq, heads, chains, sc, cu_q, cu_k,
                *_bsh(q, varlen, align), *_bsh(k, varlen, align), *_bsh(v, varlen, align),
                *_bsh(dout, varlen, align), *_bsh(dq, varlen, align), *lse_strides,
                Sq, Sk, Hkv, qk_scale, float(softmax_scale),
                CAUSAL=bool(causal), ALIGN=align, TMA_KV=strides_tma_aligned(k, v), **meta,
            )
    if atomic_dq and q.dtype != torch.float32:
        dq = dq.to(q.dtype)
    return dq, dk, dv
