"""``multi_chain_cross_entropy`` forward kernels and launcher (``triton_kernels`` has the math and
the tile plan): ``_mcce_fwd_kernel`` over (row block, vocabulary split) and
``_mcce_fwd_merge_kernel``, which merges the splits per row and scale, gathers target logits and
writes ``lse`` and the per-row outputs."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from colm_kernels._triton.rows import blocks_reached, row_plan, sorted_rows
from colm_kernels._triton.autotuning import autotune
from colm_kernels._triton.device import device_guard, small_tiles
from colm_kernels._triton.tiles import mma

from .triton_tiles import (
    LOGIT_CONFIGS,
    _align,
    _chain_k_tiles,
    _chain_table,
    _check,
    _flags,
    _fwd_pruner,
    logits_layout,
    _logit_k_tile,
    _n_counted,
    _pick,
    _put,
    _repeat,
    _sm_count,
    _tanh,
)

_MAX_SPLITS = 64  # vocabulary splits at most (partials: 2-3 x N x NS x splits fp32)


def _split_unit() -> int:
    """Columns per vocabulary-split unit: the largest BLOCK_N of the logit configs (16 in the
    interpreter), so every config's tiles fit a split exactly."""
    return max(c.kwargs["BLOCK_N"] for c in LOGIT_CONFIGS)


def _row_unit() -> int:
    """Rows per block the split plan and the backward's chunks count with (the largest BLOCK_M)."""
    return max(c.kwargs["BLOCK_M"] for c in LOGIT_CONFIGS)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# TBL rows (NUM_SCALES long): 0 chain start o_c, 1 chain width. ORDER / COUNTS: the row plan
# (``ROWS``): row blocks are blocks of positions in the rows sorted by decreasing scale. STORE (the
# fused path, ``triton_fused``): each scale's logit tile also goes to slot s of G (by position), so
# the gradient needs no second logit GEMM.
@autotune(configs=LOGIT_CONFIGS, key=["LAYOUT_KEY", "ALIGN", "ROWS", "STORE"], prune=_fwd_pruner)
@triton.jit(do_not_specialize=["N", "LAYOUT_KEY", "split_cols"])
def _mcce_fwd_kernel(
    H, W, TBL, PART, ORDER, COUNTS, G,
    N, V, stride_hn, stride_wv, split_cols, softcap, stride_gs, stride_gn,
    LAYOUT_KEY,  # autotune key (pruning)
    NUM_SCALES: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ALIGN: tl.constexpr,
    ROWS: tl.constexpr, STORE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    h_rows = H + sorted_rows(ORDER, COUNTS, 0, pos, N, ROWS)[0][:, None] * stride_hn
    m_ok = pos < N
    # The block's first row has its largest scale: the K loop stops at that scale's prefix width
    # (the states of the scales above stay empty; the merge zeroes what a row does not reach).
    n_scales = blocks_reached(COUNTS, pid_m * BLOCK_M, NUM_SCALES, ROWS)
    starts, widths, k_tiles = _chain_k_tiles(TBL, n_scales, NUM_SCALES, ALIGN, BLOCK_K)

    # Per-scale row state as tuples of (BLOCK_M,) vectors (a (BLOCK_M, NS) tile would take the
    # MMA layout of the logits, replicated to the MMA tile width: ~32 registers each). Every
    # reduction reads acc directly (acc stays live for the next chain; a masked or capped copy
    # of the tile would not fit beside it): with softcap the tile max is capped after the max
    # (tanh is monotonic). The target logit is not here: the merge kernel gathers it.
    zero = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_max = _repeat(zero + float("-inf"), NUM_SCALES)
    run_sum = _repeat(zero, NUM_SCALES)
    z_sum = _repeat(zero, NUM_SCALES)
    col0 = pid_s * split_cols
    col1 = tl.minimum(col0 + split_cols, V)
    for v0 in range(col0, col1, BLOCK_N):
        rn = v0 + tl.arange(0, BLOCK_N)
        n_ok = rn < V
        w_cols = W + rn.to(tl.int64)[None, :] * stride_wv
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        c = pid_m * 0  # chain of the current K tile, and the tile's column in it
        kc = pid_m * 0
        for _ in range(0, k_tiles):
            a, b, ends = _logit_k_tile(h_rows, w_cols, starts, widths, c, kc, m_ok, n_ok, BLOCK_K)
            acc = mma(a, b, acc)
            if ends:  # acc holds this tile's scale-c logits: fold them into scale c's state
                if STORE:  # int32 offsets in the block from a 64-bit scalar base: half the address registers
                    g_rows = G + c.to(tl.int64) * stride_gs + (pid_m * BLOCK_M).to(tl.int64) * stride_gn
                    g_offs = tl.arange(0, BLOCK_M)[:, None] * stride_gn + rn[None, :]
                    tl.store(g_rows + g_offs, acc.to(G.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
                m_old = _pick(run_max, c)
                m_new = tl.max(tl.where(n_ok[None, :], acc, float("-inf")), 1)
                if SOFTCAP:
                    m_new = softcap * _tanh(m_new / softcap)
                m_new = tl.maximum(m_old, m_new)  # finite: every tile has a valid column
                if SOFTCAP:
                    e = tl.exp(softcap * _tanh(acc / softcap) - m_new[:, None])
                else:
                    e = tl.exp(acc - m_new[:, None])
                l_new = _pick(run_sum, c) * tl.exp(m_old - m_new) + tl.sum(tl.where(n_ok[None, :], e, 0.0), 1)
                run_max = _put(run_max, c, m_new)
                run_sum = _put(run_sum, c, l_new)
                if SMOOTH:
                    if SOFTCAP:
                        zs = tl.sum(tl.where(n_ok[None, :], softcap * _tanh(acc / softcap), 0.0), 1)
                    else:
                        zs = tl.sum(tl.where(n_ok[None, :], acc, 0.0), 1)
                    z_sum = _put(z_sum, c, _pick(z_sum, c) + zs)
            c += ends.to(tl.int32)
            kc = tl.where(ends, 0, kc + BLOCK_K)

    splits = tl.num_programs(1)
    field = N.to(tl.int64) * NUM_SCALES * splits
    for s in tl.static_range(NUM_SCALES):
        offs = (pos.to(tl.int64) * NUM_SCALES + s) * splits + pid_s  # partials: by sorted position
        tl.store(PART + offs, run_max[s], mask=m_ok)
        tl.store(PART + field + offs, run_sum[s], mask=m_ok)
        if SMOOTH:
            tl.store(PART + 2 * field + offs, z_sum[s], mask=m_ok)


# Blocks of sorted positions (``ROWS``; rows through ORDER): position p counts in the scales s
# with p < COUNTS[s] only.
@triton.jit(do_not_specialize=["N", "splits", "stride_of", "stride_os"])
def _mcce_fwd_merge_kernel(
    PART, H, W, T, TBL, ORDER, COUNTS, LSE, OUT,
    N, V, stride_hn, stride_wv, stride_of, stride_os, splits, ignore_index, label_smoothing,
    lse_square_scale, softcap,
    NUM_SCALES: tl.constexpr, SCALES_P2: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    ZLOSS: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pos = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm64 = sorted_rows(ORDER, COUNTS, 0, pos, N, ROWS)[0]
    m_ok = pos < N
    sc = tl.arange(0, SCALES_P2)
    mask = m_ok[:, None] & (sc[None, :] < NUM_SCALES)
    field = N.to(tl.int64) * NUM_SCALES * splits
    base = PART + (pos.to(tl.int64)[:, None] * NUM_SCALES + sc[None, :]) * splits

    run_max = tl.full((BLOCK_R, SCALES_P2), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_R, SCALES_P2), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_R, SCALES_P2), dtype=tl.float32)
    for j in range(0, splits):  # fixed order: deterministic
        m_j = tl.load(base + j, mask=mask, other=float("-inf"))
        m_new = tl.maximum(run_max, m_j)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded entries: no inf - inf
        run_sum = run_sum * tl.exp(run_max - m_ref) + tl.load(base + field + j, mask=mask, other=0.0) * tl.exp(m_j - m_ref)
        run_max = m_new
        if SMOOTH:
            z_sum += tl.load(base + 2 * field + j, mask=mask, other=0.0)

    # Target logits: a dot of each row with its target's head row; scale s sums the columns
    # below its prefix width P_(s+1). One loop over the columns (a loop per chain would keep
    # each loop's state live). An out-of-range target reads row 0 under a false mask.
    tgt = tl.load(T + rm64, mask=m_ok, other=ignore_index)
    valid = (tgt != ignore_index)[:, None]
    in_range = (tgt >= 0) & (tgt < V)
    bad = valid & ~in_range[:, None]
    t_rows = tl.where(in_range, tgt, 0).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    width = tl.load(TBL + NUM_SCALES - 1).to(tl.int32) + tl.load(TBL + 2 * NUM_SCALES - 1).to(tl.int32)
    tgt_logit = tl.zeros((BLOCK_R, SCALES_P2), dtype=tl.float32)
    for k in range(0, width, BLOCK_D):
        kk = k + rd
        d_ok = (kk < width)[None, :]
        hv = tl.load(H + rm64[:, None] * stride_hn + kk[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        wv = tl.load(W + t_rows[:, None] * stride_wv + kk[None, :], mask=(m_ok & in_range)[:, None] & d_ok,
                     other=0.0)
        prod = hv.to(tl.float32) * wv.to(tl.float32)
        for s in tl.static_range(NUM_SCALES):
            end = tl.load(TBL + s).to(tl.int32) + tl.load(TBL + NUM_SCALES + s).to(tl.int32)
            part = tl.sum(tl.where(kk[None, :] < end, prod, 0.0), 1)
            tgt_logit = tl.where(sc[None, :] == s, tgt_logit + part[:, None], tgt_logit)
    if SOFTCAP:
        tgt_logit = softcap * _tanh(tgt_logit / softcap)

    ok = mask
    if ROWS:  # scales a row does not reach: lse 0 (never read), outputs 0 as at an ignored row
        reach = pos[:, None] < tl.load(COUNTS + sc, mask=sc < NUM_SCALES, other=0)[None, :]
        ok = ok & reach
        valid = valid & reach
    lse = tl.where(ok, run_max + tl.log(tl.where(ok, run_sum, 1.0)), 0.0)  # padding: 0, no inf
    lse = tl.where(bad & ok, float("nan"), lse)  # an unchecked out-of-range target: NaN, never a guess
    if SMOOTH:
        ce = lse - (1.0 - label_smoothing) * tgt_logit - (label_smoothing / V) * z_sum
    else:
        ce = lse - tgt_logit
    zl = tl.zeros((BLOCK_R, SCALES_P2), dtype=tl.float32)
    if ZLOSS:
        zl = lse_square_scale * lse * lse
    tl.store(LSE + rm64[:, None] * NUM_SCALES + sc[None, :], lse, mask=mask)
    out_offs = sc[None, :].to(tl.int64) * stride_os + rm64[:, None]  # OUT: (2, NS, rows) strides
    tl.store(OUT + out_offs, tl.where(valid, ce + zl, 0.0), mask=mask)
    tl.store(OUT + stride_of + out_offs, tl.where(valid, zl, 0.0), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _vocab_splits(n: int, v: int, sms: int, unit: Optional[int] = None,
                  row_unit: Optional[int] = None) -> Tuple[int, int]:
    """``(splits, columns per split)`` for the forward: the split count that minimises the busiest
    SM's time, one program per SM at a time, in ``unit``-column pieces (default
    ``_split_unit()``) of ``row_unit``-row blocks (default ``_row_unit()``), each program costing
    a quarter piece more (prologue, partials); ties go to fewer splits."""
    unit = unit or _split_unit()
    units = triton.cdiv(v, unit)
    row_blocks = triton.cdiv(max(n, 1), row_unit or _row_unit())
    best = None
    for s in range(1, min(units, _MAX_SPLITS) + 1):
        per = triton.cdiv(units, s)
        cost = triton.cdiv(row_blocks * triton.cdiv(units, per), sms) * (per + 0.25)
        if best is None or cost < best[0]:
            best = (cost, per)
    per = best[1]
    return triton.cdiv(units, per), per * unit


def _lse_and_rows(hidden, weight, targets, offsets, ignore_index, label_smoothing,
                  lse_square_scale, softcap, row_chains=None):
    """``lse (N, NS)`` and the per-row outputs ``(2, NS, N)`` (fp32; 0 on ignored rows and where
    a row does not reach a scale)."""
    n, ns = hidden.shape[0], len(offsets) - 1
    dev = hidden.device
    lse = torch.empty((n, ns), dtype=torch.float32, device=dev)
    rows = torch.empty((2, ns, n), dtype=torch.float32, device=dev)
    if n == 0:
        return lse, rows
    has_rows, order, counts = row_plan(row_chains, range(ns), n, dev)
    fwd_rows(hidden, weight, targets, offsets, ignore_index, label_smoothing, lse_square_scale, softcap,
             (has_rows, order, counts), lse, rows)
    return lse, rows


def fwd_rows(hidden, weight, targets, offsets, ignore_index, label_smoothing, lse_square_scale,
             softcap, plan, lse, rows, logits=None) -> None:
    """Fill ``lse`` and ``rows`` (``(2, NS, n)`` strided) for the ``n`` positions of ``plan``
    (``(ROWS, ORDER, COUNTS)`` of a row chunk: with ROWS, hidden, targets, lse and rows are whole
    and read through ORDER; else they are the chunk's slices). ``logits`` (``(NS, n, V)``, the
    input dtype): also store each scale's logits there, by position (the fused path)."""
    has_rows, order, counts = plan
    n = order.shape[0] if has_rows else hidden.shape[0]
    ns, v, dev = len(offsets) - 1, weight.shape[0], hidden.device
    flags = _flags(label_smoothing, lse_square_scale, softcap)
    tbl, align = _chain_table(offsets, dev, hidden.element_size())
    splits, split_cols = _vocab_splits(n, v, _sm_count(dev))
    part = torch.empty((3 if flags["SMOOTH"] else 2, n, ns, splits), dtype=torch.float32, device=dev)
    store = logits is not None
    g = logits if store else part  # never written without STORE
    with device_guard(dev):
        _mcce_fwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)](
            hidden, weight, tbl, part, order, counts, g,
            n, v, hidden.stride(0), weight.stride(0), split_cols, float(softcap),
            g.stride(0) if store else 0, g.stride(1) if store else 0,
            logits_layout("fwd", v, offsets, flags["SOFTCAP"], flags["SMOOTH"]),
            NUM_SCALES=ns, SOFTCAP=flags["SOFTCAP"], SMOOTH=flags["SMOOTH"], ALIGN=_align(align, hidden, weight),
            ROWS=has_rows, STORE=store,
        )
        block_r, block_d = (16, 16) if small_tiles() else (16, 64)
        _mcce_fwd_merge_kernel[(triton.cdiv(n, block_r),)](
            part, hidden, weight, targets, tbl, order, counts, lse, rows,
            n, v, hidden.stride(0), weight.stride(0), rows.stride(0), rows.stride(1), splits, ignore_index,
            float(label_smoothing), float(lse_square_scale), float(softcap),
            NUM_SCALES=ns, SCALES_P2=max(2, triton.next_power_of_2(ns)), SOFTCAP=flags["SOFTCAP"],
            SMOOTH=flags["SMOOTH"], ZLOSS=flags["ZLOSS"], ROWS=has_rows, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=4,
        )


def mcce_fwd(hidden, weight, targets, offsets: Sequence[int], ignore_index: int,
             reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
             softcap: float = 0.0, row_chains: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: ``out`` fp32 ``mcce_out_shape`` (row 0 loss incl. z-loss, row 1 z-loss;
    ``mean`` is NaN when no row counts, as in ``F.cross_entropy``), ``lse (N, NS)`` fp32 (what the
    backward needs). ``row_chains`` (int32 ``(N,)`` or None): row r counts in scales
    ``0..row_chains[r]`` only."""
    offsets = [int(o) for o in offsets]
    _check(hidden, weight, targets, offsets, reduction)
    lse, rows = _lse_and_rows(hidden, weight, targets, offsets, ignore_index, label_smoothing,
                              lse_square_scale, softcap, row_chains)
    if reduction == "none":
        return rows, lse
    total = rows.sum(-1)
    if reduction == "mean":
        total = total / _n_counted(targets, ignore_index, row_chains, len(offsets) - 1)
    return total, lse
