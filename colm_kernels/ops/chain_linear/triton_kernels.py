"""Triton kernels for Chain-of-Linear (block-lower-triangular GEMM), forward and both backwards.

Math (COLM_SPEC section 2). NC chains; chain i has weight ``W_i`` of shape ``(d_i, P_i)`` (d_i its
output width, P_i its input prefix width, P_1 <= ... <= P_NC), optional bias ``b_i`` of shape
``(d_i,)``. With ``o_i = d_1 + ... + d_(i-1)`` and ``N = sum_i d_i``:

    forward   y[:, o_i:o_i+d_i] = x[:, :P_i] @ W_i^T + b_i             x (M, K >= P_NC), y (M, N)
    input     dx[:, P_(j-1):P_j] = sum_{i >= j} dy_i @ W_i[:, P_(j-1):P_j]  dx (M, K), 0 past P_NC
    weight    dW_i = dy_i^T @ x[:, :P_i]                                dW_i (d_i, P_i) contiguous
    bias      db_i = sum_m dy_i[m]                                      db_i (d_i,)

with ``dy_i = dy[:, o_i:o_i+d_i]``. M is the token count (any value, never an autotune key).

Dtypes: fp16, bf16 or fp32, every tensor the same; products accumulate in fp32 (fp32 inputs use
IEEE dots, so results match torch), outputs are written once in the input dtype.

Weights: each ``W_i`` is its own 2-D tensor with ``stride(1) == 1`` and any row stride (separate
parameters, or views ``W[o_i:o_i+d_i, :P_i]`` of one dense matrix whose upper blocks are never read).
Kernels read them through an int64 table of ``data_ptr()``s plus per-chain widths/strides/offsets.

Tiles (structurally zero tiles are never launched; no tile straddles a chain boundary):
- forward: (chain i, BLOCK_N tile of d_i, BLOCK_M tile of M), K loop over [0, P_i); bias fused in
  the epilogue. Later chains (longer K loops) are enumerated first within each GROUP_M group.
- input grad: (input segment j = [P_(j-1), P_j), BLOCK_N tile of it, BLOCK_M tile of M), summing
  chains i >= j, each with its own pointer/stride and a K loop over d_i. A last segment
  [P_NC, K) has no contributing chain: its tiles write the exact zeros of ``dx[:, P_NC:]``.
- weight grad: (chain i needing it, BLOCK_M tile of d_i, BLOCK_N tile of P_i), K loop over M.
  Chains that need no gradient (frozen chain tuning) are left out of the grid.
- bias grad: (chain i needing it, BLOCK_N tile of d_i), a column sum over M.

Elastic rows (``row_chains``, one scale per row; ``ROWS`` constexpr): the launchers sort the rows
by decreasing scale (``ORDER``, int32 row indices) and count, per block, the rows whose scale
reaches its chain (``COUNTS``): those are a prefix of the sorted order. Every M index of the
kernels below is then a position in that order, read and written through ``ORDER``; a tile (or
K step over rows) past its chain's count runs no MMA and writes exact zeros, and partial tiles
mask the rows beyond it. So a mixed batch executes about the FLOPs of one batch per scale.
The plan and its device helpers are shared (``colm_kernels._triton.rows``).

Alignment: when every table pointer is 16-byte aligned and every width, offset and row stride is a
multiple of 16 bytes (``ALIGN`` = elements per 16 B, else 1), kernels hint it so loads vectorise
and pipeline (cp.async + wgmma on sm_90); otherwise they stay correct but run unpipelined.
TMA (``USE_TMA`` config knob, the autotuner's choice on sm_90+): the same tiles and math, but
operand tiles come from device-side tensor descriptors (``tile_desc``: TMA boxes into swizzled
shared memory, no per-thread addresses) whose extents stop at what the tile may read (M rows,
P_i or d_i columns), so the hardware's zero fill replaces the masks. Legal only with an aligned
table (``ALIGN > 1``), activation operands whose base and row stride are 16-byte multiples
(``TMA_OPERANDS``), no ``ROWS`` gather and 16-bit inputs; the pruner offers the TMA configs only
then (``tma_legal``), the kernels assert it, and the launchers set Triton's scratch allocator on
CUDA (descriptors are written to global scratch at launch). Outputs are stored through pointers.
Limits: per-chain widths, prefix widths and weight row strides below 2**31 (token offsets are int64,
so x / dy / y / dx may exceed 2**31 elements); M may be 0.

This file holds the kernels (and ``fwd_tile``, which the SwiGLU forward shares); their launchers
are in ``triton_launch``, the ops' registration in ``triton_backend``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from colm_kernels._triton.autotuning import autotune
from colm_kernels._triton.gemm_configs import gemm_configs, make_gemm_pruner
from colm_kernels._triton.tiles import (
    find_segment,
    grouped_tile,
    load_int,
    load_ptr,
    masked_k_loop,
    tma_k_loop,
    mma,
    segment_tile_count,
)
from colm_kernels._triton.tma import tile_desc
from colm_kernels._triton.rows import rows_used as _rows_used, sorted_rows as _rows

__all__ = ["fwd_tile", "_chain_linear_fwd_kernel", "_chain_linear_bwd_dx_kernel", "_chain_linear_bwd_dw_kernel",
           "_chain_linear_bwd_db_kernel"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def fwd_tile(WIDTHS, M, NUM_CHAINS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             GROUP_M: tl.constexpr):
    """``(tile_m, chain, tile_n)`` of this program in a forward-shaped grid: BLOCK_N tiles of every
    chain's output width (``WIDTHS``, one entry per chain) times BLOCK_M row tiles, GROUP_M-swizzled,
    later chains (longer K loops) first. Shared by the chain-linear and SwiGLU forwards."""
    num_tiles_m = tl.cdiv(M, BLOCK_M)
    num_tiles_n = segment_tile_count(WIDTHS, BLOCK_N, None, 1, NUM_CHAINS)
    tile_m, tile_n = grouped_tile(tl.program_id(0), num_tiles_m, num_tiles_n, GROUP_M)
    chain, tile_n, _na, _nb = find_segment(num_tiles_n - 1 - tile_n, WIDTHS, BLOCK_N, None, 1, NUM_CHAINS)
    return tile_m, chain, tile_n


# Forward table rows (each NUM_CHAINS long): 0 W ptr, 1 d_i, 2 P_i, 3 W row stride, 4 o_i, 5 b ptr.
@autotune(
    configs=gemm_configs(),
    key=["LAYOUT_KEY", "ALIGN", "TMA_OPERANDS", "ROWS"],
    prune=make_gemm_pruner("X"),
)
@triton.jit(do_not_specialize=["LAYOUT_KEY"])
def _chain_linear_fwd_kernel(
    X, Y, TBL, ORDER, COUNTS,
    M, stride_xm, stride_ym,
    LAYOUT_KEY,  # autotune key: the registered chain layout (pruning)
    NUM_CHAINS: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr,
    TMA_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    ELEM: tl.constexpr = X.dtype.element_ty
    tile_m, chain, tile_n = fwd_tile(TBL + 1 * NUM_CHAINS, M, NUM_CHAINS, BLOCK_M, BLOCK_N, GROUP_M)

    w_ptr = load_ptr(TBL, chain, ELEM, ALIGN > 1)
    d = load_int(TBL + 1 * NUM_CHAINS, chain, ALIGN)
    p = load_int(TBL + 2 * NUM_CHAINS, chain, ALIGN)
    stride_w = load_int(TBL + 3 * NUM_CHAINS, chain, ALIGN).to(tl.int64)
    o = load_int(TBL + 4 * NUM_CHAINS, chain, ALIGN)

    pos = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm, used = _rows(ORDER, COUNTS, chain, pos, M, ROWS)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = pos < M
    n_ok = rn < d
    # a tile whose rows all stop before this chain runs no K loop (its outputs are zeros)
    k_end = tl.where(tile_m * BLOCK_M < _rows_used(COUNTS, chain, M, ROWS), p, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:  # boxes past M rows / P_i columns / d_i rows read zeros: no masks
        tl.static_assert(ALIGN > 1 and TMA_OPERANDS and not ROWS, "TMA needs aligned operands, no ROWS")
        x_desc = tile_desc(X, M, p, stride_xm, BLOCK_M, BLOCK_K)
        w_desc = tile_desc(w_ptr, d, p, stride_w, BLOCK_N, BLOCK_K)  # W_i: read transposed
        acc = tma_k_loop(acc, x_desc, tile_m * BLOCK_M, 0, w_desc, tile_n * BLOCK_N, 0, k_end, False, False, BLOCK_K)
    else:
        x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_w + rk[:, None]  # W_i^T tile (BLOCK_K, BLOCK_N)
        acc = masked_k_loop(acc, x_ptrs, w_ptrs, used, n_ok, k_end, p, BLOCK_K, BLOCK_K, BLOCK_K)

    if HAS_BIAS:
        b_ptr = load_ptr(TBL + 5 * NUM_CHAINS, chain, ELEM, ALIGN > 1)
        bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if ROWS:
        acc = tl.where(used[:, None], acc, 0.0)  # rows whose scale stops before this chain

    y_ptrs = Y + rm[:, None] * stride_ym + (o + rn)[None, :]
    tl.store(y_ptrs, acc.to(ELEM), mask=m_ok[:, None] & n_ok[None, :])


# Input-grad tables. TBL rows (NUM_CHAINS long): 0 W ptr, 1 d_i, 2 W row stride, 3 o_i.
# SEG rows (NUM_CHAINS + 1 long): 0 segment start P_(j-1), 1 segment width (last: K - P_NC).
@autotune(
    configs=gemm_configs(),
    key=["LAYOUT_KEY", "ALIGN", "TMA_OPERANDS", "ROWS"],
    prune=make_gemm_pruner("DY"),
)
@triton.jit(do_not_specialize=["LAYOUT_KEY"])
def _chain_linear_bwd_dx_kernel(
    DY, DX, TBL, SEG, ORDER, COUNTS,
    M, stride_dym, stride_dxm,
    LAYOUT_KEY,  # autotune key: the registered chain layout (pruning)
    NUM_CHAINS: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr, TMA_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    ELEM: tl.constexpr = DY.dtype.element_ty
    NUM_SEGS: tl.constexpr = NUM_CHAINS + 1
    pid = tl.program_id(0)
    num_tiles_m = tl.cdiv(M, BLOCK_M)
    num_tiles_n = segment_tile_count(SEG + NUM_SEGS, BLOCK_N, None, 1, NUM_SEGS)
    tile_m, tile_n = grouped_tile(pid, num_tiles_m, num_tiles_n, GROUP_M)
    seg, tile_n, _na, _nb = find_segment(tile_n, SEG + NUM_SEGS, BLOCK_N, None, 1, NUM_SEGS)

    seg_start = load_int(SEG, seg, ALIGN)
    seg_width = load_int(SEG + NUM_SEGS, seg, ALIGN)
    col0 = seg_start + tile_n * BLOCK_N
    ncols = seg_width - tile_n * BLOCK_N
    if USE_TMA:
        tl.static_assert(ALIGN > 1 and TMA_OPERANDS and not ROWS, "TMA needs aligned operands, no ROWS")

    pos = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm, _ = _rows(ORDER, COUNTS, 0, pos, M, ROWS)
    rc = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = pos < M
    c_ok = rc < ncols
    dy_rows = DY + rm[:, None] * stride_dym

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # chains i >= seg read these columns (segment NUM_CHAINS, past P_NC, has none: zeros); with
    # ROWS only the rows that reach chain i contribute (the others' dy_i is not an output).
    for i in range(seg, NUM_CHAINS):
        w_ptr = load_ptr(TBL, i, ELEM, ALIGN > 1)
        d = load_int(TBL + 1 * NUM_CHAINS, i, ALIGN)
        stride_w = load_int(TBL + 2 * NUM_CHAINS, i, ALIGN).to(tl.int64)
        o = load_int(TBL + 3 * NUM_CHAINS, i, ALIGN)
        n_i = _rows_used(COUNTS, i, M, ROWS)
        used = m_ok & (pos < n_i)
        d_end = tl.where(tile_m * BLOCK_M < n_i, d, 0)
        if USE_TMA:  # dy_i = dy[:, o_i:o_i+d_i] and W_i[:, :P_seg]: zeros past them, no masks
            dy_desc = tile_desc(DY, M, o + d, stride_dym, BLOCK_M, BLOCK_K)
            w_desc = tile_desc(w_ptr, d, seg_start + seg_width, stride_w, BLOCK_K, BLOCK_N)
            acc = tma_k_loop(acc, dy_desc, tile_m * BLOCK_M, o, w_desc, 0, col0, d_end, False, True, BLOCK_K)
        else:
            dy_ptrs = dy_rows + (o + rk)[None, :]
            w_ptrs = w_ptr + rk.to(tl.int64)[:, None] * stride_w + (col0 + rc)[None, :]
            acc = masked_k_loop(acc, dy_ptrs, w_ptrs, used, c_ok, d_end, d, BLOCK_K, BLOCK_K * stride_w, BLOCK_K)

    dx_ptrs = DX + rm[:, None] * stride_dxm + (col0 + rc)[None, :]
    tl.store(dx_ptrs, acc.to(ELEM), mask=m_ok[:, None] & c_ok[None, :])


# Weight-grad table rows (one entry per chain that needs dW): 0 dW ptr, 1 d_i, 2 P_i, 3 o_i.
# Output tile BLOCK_M (rows of dW_i, over d_i) x BLOCK_N (columns, over P_i); BLOCK_K steps M.
@autotune(
    configs=gemm_configs(),
    key=["LAYOUT_KEY", "ALIGN", "TMA_OPERANDS", "ROWS"],
    prune=make_gemm_pruner("X"),
)
@triton.jit(do_not_specialize=["LAYOUT_KEY"])
def _chain_linear_bwd_dw_kernel(
    DY, X, TBL, ORDER, COUNTS,
    M, stride_dym, stride_xm,
    LAYOUT_KEY,  # autotune key: the registered chain layout (pruning)
    NUM_CHAINS: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr, TMA_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    ELEM: tl.constexpr = X.dtype.element_ty
    pid = tl.program_id(0)
    chain, local, tiles_d, tiles_p = find_segment(
        pid, TBL + 1 * NUM_CHAINS, BLOCK_M, TBL + 2 * NUM_CHAINS, BLOCK_N, NUM_CHAINS)
    tile_d, tile_p = grouped_tile(local, tiles_d, tiles_p, GROUP_M)

    dw_ptr = load_ptr(TBL, chain, ELEM, ALIGN > 1)
    d = load_int(TBL + 1 * NUM_CHAINS, chain, ALIGN)
    p = load_int(TBL + 2 * NUM_CHAINS, chain, ALIGN)
    o = load_int(TBL + 3 * NUM_CHAINS, chain, ALIGN)

    rd = tile_d * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = tile_p * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    d_ok = rd < d
    p_ok = rp < p
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        tl.static_assert(ALIGN > 1 and TMA_OPERANDS and not ROWS, "TMA needs aligned operands, no ROWS")
    if ROWS:
        # the K loop runs over the sorted rows that reach this chain, gathered through ORDER
        n_rows = tl.load(COUNTS + chain)
        for k in range(0, n_rows, BLOCK_K):
            k_ok = rk < n_rows - k
            rows = tl.load(ORDER + k + rk, mask=k_ok, other=0).to(tl.int64)
            a = tl.load(DY + rows[None, :] * stride_dym + (o + rd)[:, None],
                        mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(X + rows[:, None] * stride_xm + rp[None, :], mask=k_ok[:, None] & p_ok[None, :],
                        other=0.0)
            acc = mma(a, b, acc)
    elif USE_TMA:  # dy[:, :o_i+d_i] and x[:, :P_i] as (M, .) matrices: zeros past them, no masks
        dy_desc = tile_desc(DY, M, o + d, stride_dym, BLOCK_K, BLOCK_M)  # dy_i: read transposed
        x_desc = tile_desc(X, M, p, stride_xm, BLOCK_K, BLOCK_N)
        acc = tma_k_loop(acc, dy_desc, 0, o + tile_d * BLOCK_M, x_desc, 0, tile_p * BLOCK_N, M, True, True, BLOCK_K)
    else:
        dy_ptrs = DY + rk.to(tl.int64)[None, :] * stride_dym + (o + rd)[:, None]  # dy_i^T tile (BLOCK_M, BLOCK_K)
        x_ptrs = X + rk.to(tl.int64)[:, None] * stride_xm + rp[None, :]  # (BLOCK_K, BLOCK_N)
        acc = masked_k_loop(acc, dy_ptrs, x_ptrs, d_ok, p_ok, M, M, tl.cast(stride_dym, tl.int64) * BLOCK_K,
                            tl.cast(stride_xm, tl.int64) * BLOCK_K, BLOCK_K)

    dw_ptrs = dw_ptr + rd.to(tl.int64)[:, None] * p + rp[None, :]
    tl.store(dw_ptrs, acc.to(ELEM), mask=d_ok[:, None] & p_ok[None, :])


# Bias-grad table rows (one entry per chain that needs db): 0 db ptr, 1 d_i, 2 o_i.
@triton.jit(do_not_specialize=["M"])
def _chain_linear_bwd_db_kernel(
    DY, TBL, ORDER, COUNTS, M, stride_dym,
    NUM_CHAINS: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    ELEM: tl.constexpr = DY.dtype.element_ty
    pid = tl.program_id(0)
    chain, tile_n, _na, _nb = find_segment(pid, TBL + 1 * NUM_CHAINS, BLOCK_N, None, 1, NUM_CHAINS)
    db_ptr = load_ptr(TBL, chain, ELEM, ALIGN > 1)
    d = load_int(TBL + 1 * NUM_CHAINS, chain, ALIGN)
    o = load_int(TBL + 2 * NUM_CHAINS, chain, ALIGN)

    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_rows = _rows_used(COUNTS, chain, M, ROWS)  # sorted rows that reach this chain
    for m in range(0, n_rows, BLOCK_M):
        rows, used = _rows(ORDER, COUNTS, chain, m + rm, n_rows, ROWS)
        g = tl.load(DY + rows[:, None] * stride_dym + (o + rn)[None, :], mask=used[:, None] & n_ok[None, :],
                    other=0.0)
        acc += g.to(tl.float32)
    tl.store(db_ptr + rn, tl.sum(acc, axis=0).to(ELEM), mask=n_ok)
