"""``multi_chain_cross_entropy``'s fused path: the loss and its gradients in 3 logit-sized GEMMs,
when the upstream gradient is known up to one scalar (a weighted total of the per-scale losses,
or a single scale).

Per row chunk (``triton_bwd.chunk_rows``), in order:
1. ``_mcce_fwd_kernel`` with ``STORE`` (``triton_fwd``): the logit GEMM; its online softmax
   partials as in the plain forward, and each scale's logit tile ``x_s`` in slot s of the
   fp32 ``(NS, rows, V)`` workspace; ``_mcce_fwd_merge_kernel`` then writes the chunk's
   ``lse`` and per-row losses (exact fp32, from the GEMM's accumulator, not the stored logits).
2. ``_mcce_fused_grad_kernel`` (no GEMM): per block of whole rows reads ``x_s`` from the last
   scale down, turns it into ``D_s`` (``triton_tiles._dlogits``, the backward's epilogue, with the
   per-scale weights as the upstream gradient) and writes the suffix sums ``G_c`` over them.
3. the backward's dh and dW GEMMs (``triton_bwd.grad_gemms``).
The autograd backward multiplies the saved ``dh`` and ``dW`` by the upstream scalar: no GEMM.

GEMMs: 3 x ``2 N V P`` against 4 on the plain path. The logits are kept in fp32 (Liger keeps them
in the input dtype; that took fp16 gradients past 3x eager PyTorch's error), so the gradients are
the plain path's up to summation order; ``G`` in the input dtype is written over them
(``overlay``): 4 workspace bytes an entry whatever the dtype. Saved for backward: ``dh`` (like hidden) and ``dW`` (like weight),
nothing else: no per-scale copy of anything.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from colm_kernels._triton.device import device_guard, small_tiles
from colm_kernels._triton.rows import blocks_reached, row_plan
from colm_kernels._triton.tma import operands_tma_aligned

from .triton_bwd import _upstream_weights, chunk_plan, chunk_rows, grad_gemms, mcce_bwd, new_grads, workspace
from .triton_fwd import fwd_rows, mcce_fwd
from .triton_tiles import _chain_table, _check, _dlogits, _flags, _n_counted, grad_layouts


# X (NS, rows, V, fp32) holds x_s by position; G_c = sum_{s >= c} D_s is written over it, in the
# input dtype (``overlay``): G's row r of slot s is the first bytes of X's. A program owns whole rows
# and walks their columns left to right, so a 16-bit store at column v (X's column v / 2) only
# overwrites logits it has read already; the barrier orders the first tile's loads before its
# stores across the program's threads. T, LSE: the chunk's rows in position order. With ROWS the
# slots above a block's largest scale were never written (the forward's K loop stopped there):
# predicated off. Not autotuned: it rewrites X in place (a benchmark rerun would apply it twice).
@triton.jit(do_not_specialize=["N"])
def _mcce_fused_grad_kernel(
    X, G, T, LSE, WT, COUNTS,
    N, V, stride_xs, stride_xn, stride_gs, stride_gn, ignore_index, label_smoothing, lse_square_scale, softcap,
    NUM_SCALES: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    ELEM: tl.constexpr = G.dtype.element_ty
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = pos < N
    pos64 = pos.to(tl.int64)
    tgt = tl.load(T + pos64, mask=m_ok, other=ignore_index)
    valid = m_ok & (tgt != ignore_index)
    tgt32 = tl.where((tgt >= 0) & (tgt < V), tgt, -1).to(tl.int32)  # never an address
    n_scales = blocks_reached(COUNTS, tl.program_id(0) * BLOCK_M, NUM_SCALES, ROWS)
    for v0 in range(0, V, BLOCK_N):
        rn = v0 + tl.arange(0, BLOCK_N)
        n_ok = rn < V
        rn64 = rn.to(tl.int64)[None, :]
        x_ptrs = X + pos64[:, None] * stride_xn + rn64
        g_ptrs = G + pos64[:, None] * stride_gn + rn64
        st_mask = m_ok[:, None] & n_ok[None, :]
        run = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(NUM_SCALES):
            s = NUM_SCALES - 1 - j
            mask = st_mask
            if ROWS:
                mask = tl.where(s < n_scales, mask, False)
            x = tl.load(x_ptrs + s * stride_xs, mask=mask, other=0.0)
            run += _dlogits(x, s, pos64, rn, m_ok, valid, n_ok, tgt32, LSE, WT, N, V, NUM_SCALES, 1,
                            label_smoothing, lse_square_scale, softcap, COUNTS, NUM_SCALES, SOFTCAP, SMOOTH,
                            ZLOSS, False, ROWS)
            tl.debug_barrier()  # every thread's loads of this slot's tile before any store over them
            tl.store(g_ptrs + s * stride_gs, run.to(ELEM), mask=mask)


def overlay(xbuf: torch.Tensor, dtype) -> torch.Tensor:
    """``G`` in ``dtype`` over the fp32 workspace ``xbuf`` (``(NS, rows, V)``, rows padded to 16
    bytes): the same tensor for fp32, else a view whose row r of slot s starts where xbuf's does."""
    if dtype == torch.float32:
        return xbuf
    base = xbuf._base if xbuf._base is not None else xbuf
    return base.view(dtype)[:, :, : xbuf.shape[2]]


def fusable(hidden: torch.Tensor, weight: torch.Tensor, offsets: Sequence[int], softcap: float) -> bool:
    """Whether ``mcce_fused`` runs its 3 GEMMs (else the per-scale kernels, 4 GEMMs, both in the
    forward: the same outputs, so the choice needs no host look at pointers in traced code). Declined: a
    vocabulary of 2**23 or more (the logit store's int32 offsets in a row block), and softcap with
    operands that are not 16-byte aligned (their tiles load through registers: the logit kernel
    with the store spilled 52 B on sm_90a even at its smallest tile, fp16 widths 24/16)."""
    if weight.shape[0] >= 2**23:
        return False
    step = max(1, 16 // hidden.element_size())
    aligned = all(int(o) % step == 0 for o in offsets) and operands_tma_aligned(hidden, weight)
    return aligned or not softcap


# Workspace bytes per (scale, row, column) of the fused path, whatever the input dtype: fp32
# logits, with G written over them.
WORKSPACE_BYTES = 4


def _grad_tile():
    """(BLOCK_M, BLOCK_N, warps) of ``_mcce_fused_grad_kernel``."""
    # whole rows a program, 4 of them; 4 x 512 / 4 warps spilled 8 B with every option
    return (4, 16, 1) if small_tiles() else (4, 256, 4)


def mcce_fused(hidden, weight, targets, weights, offsets: Sequence[int], ignore_index: int,
               reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
               softcap: float = 0.0, row_chains: Optional[torch.Tensor] = None,
               needs_hidden: bool = True, needs_weight: bool = True):
    """``(out (2,), dh | None, dW | None)``: ``out[0] = sum_s weights[s] loss_s`` (loss with the
    z-loss, reduced as ``reduction``: ``mean`` or ``sum``), ``out[1]`` the same sum of the z-losses;
    ``dh``, ``dW`` the gradients of ``out[0]`` in fp32 (the backward scales and rounds them)."""
    offsets = [int(o) for o in offsets]
    _check(hidden, weight, targets, offsets, reduction)
    if reduction == "none":
        raise ValueError("the fused path needs a reduced loss (reduction 'mean' or 'sum')")
    if not fusable(hidden, weight, offsets, softcap):
        options = (reduction, label_smoothing, lse_square_scale, softcap)
        out, lse = mcce_fwd(hidden, weight, targets, offsets, ignore_index, *options, row_chains)
        if not (needs_hidden or needs_weight):
            return (out * weights.to(out)).sum(-1), None, None
        dh, dw = mcce_bwd(weights.to(torch.float32), hidden, weight, targets, offsets, ignore_index, needs_hidden,
                          needs_weight, lse=lse, reduction=reduction, label_smoothing=label_smoothing,
                          lse_square_scale=lse_square_scale, softcap=softcap, row_chains=row_chains,
                          grad_dtype=torch.float32)
        return (out * weights.to(out)).sum(-1), dh, dw
    n, ns, v = hidden.shape[0], len(offsets) - 1, weight.shape[0]
    p = offsets[-1]
    dev = hidden.device
    weights = weights.to(device=dev, dtype=torch.float32)
    lse = torch.empty((n, ns), dtype=torch.float32, device=dev)
    rows = torch.empty((2, ns, n), dtype=torch.float32, device=dev)
    # fp32 gradients: the backward's upstream scalar then rounds them to the input dtype once
    dh, dw = new_grads(hidden, weight, p, needs_hidden, needs_weight, torch.float32)
    if n > 0:
        plan = row_plan(row_chains, range(ns), n, dev)
        wt, alpha = _upstream_weights(weights, targets, ignore_index, reduction, row_chains)
        flags = _flags(label_smoothing, lse_square_scale, softcap)
        tbl, align = _chain_table(offsets, dev, hidden.element_size())
        widths = [b - a for a, b in zip(offsets, offsets[1:])]
        keys = grad_layouts(v, offsets)
        chunk = chunk_rows(n, ns, v, p, WORKSPACE_BYTES, needs_weight)
        # fp32 logits: the gradient's softmax sees the GEMM's accumulator, not a 16-bit rounding
        # (which took fp16 gradients past 3x eager PyTorch's error); G in the input dtype over them
        xbuf = workspace(ns, chunk, v, torch.float32, dev)
        gbuf = overlay(xbuf, hidden.dtype)
        starts = list(range(0, n, chunk))
        acc = dw  # fp32 already: the chunks add up in dW itself (no separate accumulator)
        order = plan[1].long() if plan[0] else None
        bm, bn, warps = _grad_tile()
        for i, r0 in enumerate(starts):
            nr = min(chunk, n - r0)
            sel, plan_c = chunk_plan(plan, r0, nr)
            h = hidden[sel]
            lse_c = lse[sel]
            rows_c = rows[:, :, sel]
            fwd_rows(h, weight, targets[sel], offsets, ignore_index, label_smoothing, lse_square_scale,
                     softcap, plan_c, lse_c, rows_c, logits=xbuf)
            # the gradient pass reads targets and lse by position (sorted order with ROWS)
            if order is not None:
                t_pos, lse_pos = targets[order[r0:r0 + nr]], lse[order[r0:r0 + nr]]
            else:
                t_pos, lse_pos = targets[sel], lse_c
            with device_guard(dev):
                _mcce_fused_grad_kernel[(triton.cdiv(nr, bm),)](
                    xbuf, gbuf, t_pos, lse_pos, wt, plan_c[2],
                    nr, v, xbuf.stride(0), xbuf.stride(1), gbuf.stride(0), gbuf.stride(1), ignore_index, float(label_smoothing),
                    float(lse_square_scale), float(softcap),
                    NUM_SCALES=ns, ROWS=plan[0], BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **flags,
                )
                grad_gemms(gbuf, h, weight, tbl, align, alpha, widths, keys, plan_c, nr,
                           dh=dh[sel] if needs_hidden else None, dw=dw, acc=acc, first=i == 0,
                           last=i == len(starts) - 1)
    total = rows.sum(-1)
    if reduction == "mean":
        total = total / _n_counted(targets, ignore_index, row_chains, ns)
    return (total * weights).sum(-1), dh, dw


def step_bytes(n: int, v: int, offsets: Sequence[int], elem: int, d: Optional[int] = None,
               smooth: bool = False) -> dict:
    """HBM bytes one fused training step moves (forward with the gradients, then the backward's
    scaling), counted from the tiling: every kernel reads each operand it needs once and writes
    each result once (tile re-reads that L2 serves are not counted; the GEMMs' head reads are,
    once per chunk). ``dw_accumulation``: dW's fp32 buffer across the row chunks, ``4 V P (2C - 1)``
    (the first chunk writes it, each later one reads and writes it). Exact for the launcher's
    chunk plan (``chunk_rows``, ``_vocab_splits``) without per-row scales."""
    from .triton_fwd import _vocab_splits
    from .triton_tiles import _sm_count

    ns, p = len(offsets) - 1, offsets[-1]
    d = d or p
    chunk = chunk_rows(n, ns, v, p, WORKSPACE_BYTES, True)
    sizes = [min(chunk, n - r0) for r0 in range(0, n, chunk)]
    g_elem = min(elem, 4)  # G, written over the fp32 logits
    parts = {"logit_gemm": 0, "merge": 0, "grad_pass": 0, "dh_gemm": 0, "dw_gemm": 0}
    for r in sizes:
        splits, _ = _vocab_splits(r, v, _sm_count(torch.device("cpu")))  # an H100's 132 SMs
        partials = (3 if smooth else 2) * r * ns * splits * 4
        parts["logit_gemm"] += r * p * elem + v * p * elem + ns * r * v * 4 + partials
        parts["merge"] += partials + 2 * r * p * elem + r * 8 + r * ns * 4 + 2 * ns * r * 4
        parts["grad_pass"] += ns * r * v * (4 + g_elem) + r * 8 + r * ns * 4
        parts["dh_gemm"] += ns * r * v * g_elem + v * p * elem + r * p * 4
        parts["dw_gemm"] += ns * r * v * g_elem + r * p * elem
    dw_acc = 4 * v * p * (2 * len(sizes) - 1)
    parts["dw_gemm"] += dw_acc
    parts["backward_scale"] = n * p * (4 + elem) + v * d * (4 + elem)
    return dict(parts, chunk_rows=chunk, chunks=len(sizes), dw_accumulation=dw_acc, total=sum(parts.values()))
