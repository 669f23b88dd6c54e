"""Triton kernels for the multi-chain (Matryoshka-style) cross-entropy, forward and backward.

Math (COLM_SPEC section 3). Hidden ``h`` is ``(N, P_k)`` (N tokens, ``P_k`` the prefix width of the
active scales ``0..NS-1``), weight ``W`` is ``(V, D)`` with ``D >= P_k``, chain ``c`` owns columns
``[o_c, o_(c+1))`` of both (``offsets = (0, P_1, ..., P_k)``, NS = ``len(offsets) - 1``):

    logits_s = sum_{c <= s} h[:, chain c] @ W[:, chain c]^T          (never materialised)
    lse_s[i] = logsumexp_v logits_s[i, v]
    loss_s   = mean over rows i with targets[i] != ignore_index of (lse_s[i] - logits_s[i, t_i])

Backward, with ``D_s = (softmax(logits_s) - onehot(t)) * g_s / n_valid`` (zero on ignored rows) and
``G_c = sum_{s >= c} D_s`` (only the scales that include chain ``c``):

    dh[:, chain c] = G_c @ W[:, chain c]          dW[:, chain c] = G_c^T @ h[:, chain c]

Kernels:
- ``_mcce_fwd_kernel``: one program per BLOCK_M rows loops over every BLOCK_N vocab block; for each
  tile it runs one K loop per chain segment into a running fp32 tile (after chain ``s`` the tile
  holds the scale-``s`` logits) and updates, per scale, an online logsumexp (running max and sum,
  kept in a ``(BLOCK_M, NS)`` register tile) and the target logit. It writes ``lse (N, NS)`` and
  the per-row losses ``(N, NS)`` (0 on ignored rows); the launcher sums the rows (no atomics, so
  the result is deterministic). Memory: O(N * NS) besides the inputs.
- ``_mcce_bwd_dlogits_kernel``: one program per (BLOCK_M rows of a row chunk, BLOCK_N vocab) tile
  recomputes the logits chain by chain from the saved ``lse`` and writes the combined per-chain
  gradients ``G_c`` for the chunk, ``(NS, rows, V)`` fp32, as ``G_c = T - P_c`` (``P_c`` the prefix
  sum ``sum_{s<c} D_s`` stored on the way, ``T`` the total). The launcher then forms ``dh`` and
  ``dW`` with fp32 torch matmuls per chain, chunk by chunk: memory O(NS * chunk * V), never an
  ``(N, V)`` tensor per scale (``_CHUNK_ELEMS`` bounds the chunk).

Dtypes: fp16, bf16 (GPU only: the interpreter's bf16 ``tl.dot`` is wrong) or fp32 inputs; dots
accumulate in fp32 (IEEE for fp32 inputs), softmax/logsumexp math is fp32, losses are fp32, the
gradients are accumulated in fp32 and written once in the input dtype. Row offsets are int64; the
vocabulary and widths must stay below 2**31. Block sizes are fixed (no autotuning): 16x16x16 in the
interpreter, 64x64x32 on a GPU.

This file holds kernels and launchers only; the op is registered in ``triton.py``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from colm_kernels._triton.utils import (
    check_tensor,
    device_guard,
    int64_table,
    is_interpreter,
    last_dim_contiguous,
    mma,
)

__all__ = ["mcce_out_shape", "mcce_fwd", "mcce_bwd"]

# Upper bound on the elements of the backward's per-chunk gradient buffer (NS x rows x V, fp32):
# 2**26 elements = 256 MiB. Tests lower it to force several chunks.
_CHUNK_ELEMS = 1 << 26


def _blocks() -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    return (16, 16, 16, 1) if is_interpreter() else (64, 64, 32, 4)


def mcce_out_shape(offsets: Sequence[int]) -> Tuple[int]:
    """The losses' shape, ``(NS,)``: one per scale (the fake implementation uses it too)."""
    return (len(offsets) - 1,)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _chain_partial_logits(acc, H, W, OFF, s, rm64, m_ok, rn64, n_ok, stride_hn, stride_wv,
                          BLOCK_K: tl.constexpr):
    """``acc + h[rows, chain s] @ W[cols, chain s]^T`` (fp32), one K loop over chain ``s``."""
    lo = tl.load(OFF + s).to(tl.int32)
    hi = tl.load(OFF + s + 1).to(tl.int32)
    rk = tl.arange(0, BLOCK_K)
    for k in range(lo, hi, BLOCK_K):
        kk = k + rk
        k_ok = kk < hi
        a = tl.load(H + rm64[:, None] * stride_hn + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(W + rn64[None, :] * stride_wv + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc)
    return acc


@triton.jit
def _mcce_fwd_kernel(
    H, W, T, OFF, LSE, ROWLOSS,
    N, V, stride_hn, stride_wv, ignore_index,
    NUM_SCALES: tl.constexpr, SCALES_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < N
    rm64 = rm.to(tl.int64)
    tgt = tl.load(T + rm64, mask=m_ok, other=ignore_index)
    valid = m_ok & (tgt != ignore_index)
    sc = tl.arange(0, SCALES_P2)

    run_max = tl.full((BLOCK_M, SCALES_P2), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M, SCALES_P2), dtype=tl.float32)
    tgt_logit = tl.zeros((BLOCK_M, SCALES_P2), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_N):
        rn = v0 + tl.arange(0, BLOCK_N)
        n_ok = rn < V
        rn64 = rn.to(tl.int64)
        hit = rn64[None, :] == tgt[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(NUM_SCALES):
            acc = _chain_partial_logits(acc, H, W, OFF, s, rm64, m_ok, rn64, n_ok, stride_hn,
                                        stride_wv, BLOCK_K)
            # acc now holds the scale-s logits of this tile: fold them into scale s's state.
            z = tl.where(n_ok[None, :], acc, float("-inf"))
            sel = sc[None, :] == s
            m_old = tl.max(tl.where(sel, run_max, float("-inf")), 1)
            l_old = tl.sum(tl.where(sel, run_sum, 0.0), 1)
            m_new = tl.maximum(m_old, tl.max(z, 1))  # finite: every tile has a valid column
            l_new = l_old * tl.exp(m_old - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            t_add = tl.sum(tl.where(hit, acc, 0.0), 1)
            run_max = tl.where(sel, m_new[:, None], run_max)
            run_sum = tl.where(sel, l_new[:, None], run_sum)
            tgt_logit = tl.where(sel, tgt_logit + t_add[:, None], tgt_logit)

    lse = run_max + tl.log(tl.where(sc[None, :] < NUM_SCALES, run_sum, 1.0))  # pad: no log(0)
    out_mask = m_ok[:, None] & (sc[None, :] < NUM_SCALES)
    offs = rm64[:, None] * NUM_SCALES + sc[None, :]
    tl.store(LSE + offs, lse, mask=out_mask)
    tl.store(ROWLOSS + offs, tl.where(valid[:, None], lse - tgt_logit, 0.0), mask=out_mask)


@triton.jit
def _mcce_bwd_dlogits_kernel(
    H, W, T, OFF, LSE, GS, G,
    N, V, stride_hn, stride_wv, stride_gs, stride_gn, ignore_index,
    NUM_SCALES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < N
    n_ok = rn < V
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    tgt = tl.load(T + rm64, mask=m_ok, other=ignore_index)
    valid = m_ok & (tgt != ignore_index)
    keep = valid[:, None] & n_ok[None, :]
    onehot = tl.where(rn64[None, :] == tgt[:, None], 1.0, 0.0)
    g_ptrs = G + rm64[:, None] * stride_gn + rn64[None, :]
    st_mask = m_ok[:, None] & n_ok[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    prefix = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(NUM_SCALES):
        acc = _chain_partial_logits(acc, H, W, OFF, s, rm64, m_ok, rn64, n_ok, stride_hn,
                                    stride_wv, BLOCK_K)
        lse = tl.load(LSE + rm64 * NUM_SCALES + s, mask=m_ok, other=0.0)
        g = tl.load(GS + s)
        d = tl.where(keep, (tl.exp(acc - lse[:, None]) - onehot) * g, 0.0)
        tl.store(g_ptrs + s * stride_gs, prefix, mask=st_mask)  # P_s = sum_{c < s} D_c
        prefix += d
    tl.debug_barrier()  # the prefixes are read back below, possibly by other threads
    for c in tl.static_range(NUM_SCALES):
        p = tl.load(g_ptrs + c * stride_gs, mask=st_mask, other=0.0)
        tl.store(g_ptrs + c * stride_gs, prefix - p, mask=st_mask)  # G_c = sum_{s >= c} D_s


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _check(hidden, weight, targets, offsets):
    check_tensor("weight", weight, ndim=2)
    check_tensor("hidden", hidden, ndim=2, dtype=weight.dtype, device=weight.device)
    if targets.dtype != torch.int64 or targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be int64 of shape ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != hidden.shape[1] or \
            offsets[-1] > weight.shape[1] or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets {list(offsets)} must rise from 0 to hidden.shape[1]="
                         f"{hidden.shape[1]} <= weight.shape[1]={weight.shape[1]}")


def _lse_rowloss(hidden, weight, targets, offsets, ignore_index):
    """``lse (N, NS)`` and per-row losses ``(N, NS)`` (fp32; 0 on ignored rows)."""
    n, ns, v = hidden.shape[0], len(offsets) - 1, weight.shape[0]
    lse = torch.empty((n, ns), dtype=torch.float32, device=hidden.device)
    rowloss = torch.empty((n, ns), dtype=torch.float32, device=hidden.device)
    if n == 0:
        return lse, rowloss
    bm, bn, bk, warps = _blocks()
    off = int64_table([offsets], hidden.device)
    with device_guard(hidden.device):
        _mcce_fwd_kernel[(triton.cdiv(n, bm),)](
            hidden, weight, targets, off, lse, rowloss,
            n, v, hidden.stride(0), weight.stride(0), ignore_index,
            NUM_SCALES=ns, SCALES_P2=max(2, triton.next_power_of_2(ns)),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        )
    return lse, rowloss


def mcce_fwd(hidden, weight, targets, offsets: Sequence[int], ignore_index: int) -> torch.Tensor:
    """Losses ``(NS,)`` fp32: mean over non-ignored rows (NaN when every row is ignored, as in
    ``F.cross_entropy``)."""
    offsets = [int(o) for o in offsets]
    _check(hidden, weight, targets, offsets)
    hidden, weight = last_dim_contiguous(hidden), last_dim_contiguous(weight)
    _, rowloss = _lse_rowloss(hidden, weight, targets, offsets, ignore_index)
    n_valid = (targets != ignore_index).sum().to(torch.float32)
    return rowloss.sum(0) / n_valid


def mcce_bwd(grad, hidden, weight, targets, offsets: Sequence[int], ignore_index: int,
             needs_hidden: bool = True, needs_weight: bool = True):
    """``(dh (N, P_k) | None, dW (V, D) | None)`` in the input dtype for losses' gradient
    ``grad (NS,)``; ``lse`` is recomputed (one forward pass) and logits are rebuilt tile by tile."""
    offsets = [int(o) for o in offsets]
    _check(hidden, weight, targets, offsets)
    hidden, weight = last_dim_contiguous(hidden), last_dim_contiguous(weight)
    n, ns, v = hidden.shape[0], len(offsets) - 1, weight.shape[0]
    dev = hidden.device
    dh32 = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if needs_hidden else None
    dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if needs_weight else None
    if n and (needs_hidden or needs_weight):
        lse, _ = _lse_rowloss(hidden, weight, targets, offsets, ignore_index)
        n_valid = (targets != ignore_index).sum().to(torch.float32)
        gs = (grad.to(device=dev, dtype=torch.float32) / n_valid).contiguous()
        bm, bn, bk, warps = _blocks()
        chunk = max(bm, (_CHUNK_ELEMS // max(1, ns * v)) // bm * bm)
        chunk = min(chunk, triton.cdiv(n, bm) * bm)
        gbuf = torch.empty((ns, chunk, v), dtype=torch.float32, device=dev)
        off = int64_table([offsets], dev)
        w32 = weight[:, : offsets[-1]].float()
        for r0 in range(0, n, chunk):
            rows = min(chunk, n - r0)
            h = hidden[r0: r0 + rows]
            with device_guard(dev):
                _mcce_bwd_dlogits_kernel[(triton.cdiv(rows, bm), triton.cdiv(v, bn))](
                    h, weight, targets[r0: r0 + rows], off, lse[r0: r0 + rows], gs, gbuf,
                    rows, v, h.stride(0), weight.stride(0), gbuf.stride(0), gbuf.stride(1),
                    ignore_index,
                    NUM_SCALES=ns, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                )
            h32 = h.float()
            for c in range(ns):
                lo, hi = offsets[c], offsets[c + 1]
                if hi == lo:
                    continue
                g = gbuf[c, :rows]
                if needs_hidden:
                    dh32[r0: r0 + rows, lo:hi] = g @ w32[:, lo:hi]
                if needs_weight:
                    dw32[:, lo:hi].addmm_(g.T, h32[:, lo:hi])
    dh = dh32.to(hidden.dtype) if needs_hidden else None
    dw = dw32.to(weight.dtype) if needs_weight else None
    return dh, dw
