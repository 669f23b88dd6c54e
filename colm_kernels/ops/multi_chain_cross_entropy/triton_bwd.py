"""``multi_chain_cross_entropy`` backward kernels and launcher (``triton_kernels`` has the math and
the tile plan): ``_mcce_bwd_dlogits_kernel`` rebuilds logit tiles from the saved logsumexp and
writes the per-chain gradients ``G_c`` of a row chunk; ``_mcce_bwd_dh_kernel`` and
``_mcce_bwd_dw_kernel`` are the two gradient GEMMs over them."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from colm_kernels._triton.rows import blocks_reached, row_plan, rows_used, sorted_rows
from colm_kernels._triton.autotuning import autotune
from colm_kernels._triton.device import device_guard
from colm_kernels._triton.tables import tile_count
from colm_kernels._triton.tiles import (
    find_segment,
    grouped_tile,
    load_int,
    masked_k_loop,
    mma,
    segment_tile_count,
)

from .triton_fwd import _lse_and_rows, _row_unit
from .triton_tiles import (
    GRAD_CONFIGS,
    LOGIT_CONFIGS,
    _align,
    _chain_k_tiles,
    _chain_table,
    _check,
    _dh_pruner,
    _dlogits_pruner,
    _dw_pruner,
    _dlogits,
    _flags,
    _logit_k_tile,
    _n_counted,
    grad_layouts,
    logits_layout,
)

# Bytes of the backward's G workspace (NS x rows x V, input dtype). Tests lower it to force several
# row chunks. 1 GiB: the default bench case (bf16, N 4096, V 32000, 4 scales) is one chunk.
_WORKSPACE_BYTES = 1 << 30
# With several chunks and dW wanted, the workspace is at least this many fp32 dW accumulators
# (V x P x 4 bytes): bounds the accumulator's per-chunk round trips (``chunk_rows``). Tests set 0.
_ACC_RATIO = 2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# WT: upstream weights over alpha, (2, NS) or (2, NS, rows) (ROW_WEIGHTS): 0 loss, 1 loss + z-loss.
# M indices are positions in the row plan (``ROWS``: rows sorted by decreasing scale). Only H's
# rows are read through ORDER: T, LSE, WT and G are in sorted order (the launcher gathers the
# small per-row ones), so no gathered row index stays live beside the logit tile, and the GEMMs
# below read G_c's rows that reach chain c as a prefix.
@autotune(configs=LOGIT_CONFIGS, key=["LAYOUT_KEY", "ALIGN", "ROWS"], prune=_dlogits_pruner)
@triton.jit(do_not_specialize=["N", "LAYOUT_KEY"])
def _mcce_bwd_dlogits_kernel(
    H, W, T, TBL, LSE, WT, G, ORDER, COUNTS,
    N, V, stride_hn, stride_wv, stride_gs, stride_gn, stride_wf, stride_ws, ignore_index,
    label_smoothing, lse_square_scale, softcap,
    LAYOUT_KEY,  # autotune key (pruning)
    NUM_SCALES: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr,
    ROW_WEIGHTS: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    ELEM: tl.constexpr = G.dtype.element_ty
    pid = tl.program_id(0)
    tile_m, tile_n = grouped_tile(pid, tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    pos = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h_rows = H + sorted_rows(ORDER, COUNTS, 0, pos, N, ROWS)[0][:, None] * stride_hn
    m_ok = pos < N
    n_ok = rn < V
    pos64 = pos.to(tl.int64)
    rn64 = rn.to(tl.int64)
    tgt = tl.load(T + pos64, mask=m_ok, other=ignore_index)
    valid = m_ok & (tgt != ignore_index)
    tgt32 = tl.where((tgt >= 0) & (tgt < V), tgt, -1).to(tl.int32)  # never an address
    w_cols = W + rn64[None, :] * stride_wv
    g_ptrs = G + pos64[:, None] * stride_gn + rn64[None, :]
    st_mask = m_ok[:, None] & n_ok[None, :]
    # The K loop stops at the prefix width of the block's largest scale (its first row's); the G
    # slots above it are never read for these rows (the GEMMs stop at each chain's count).
    n_scales = blocks_reached(COUNTS, tile_m * BLOCK_M, NUM_SCALES, ROWS)
    starts, widths, k_tiles = _chain_k_tiles(TBL, n_scales, NUM_SCALES, ALIGN, BLOCK_K)
    if ROWS:
        last = tl.maximum(n_scales - 1, 0)
    else:
        last = NUM_SCALES - 1

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c = pid * 0  # chain of the current K tile, and the tile's column in it
    kc = pid * 0
    for _ in range(0, k_tiles):
        a, b, ends = _logit_k_tile(h_rows, w_cols, starts, widths, c, kc, m_ok, n_ok, BLOCK_K)
        acc = mma(a, b, acc)
        if ends & (c < last):  # the last scale's D stays in registers (below)
            d = _dlogits(acc, c, pos64, rn, m_ok, valid, n_ok, tgt32, LSE, WT, N, V, stride_wf, stride_ws,
                         label_smoothing, lse_square_scale, softcap, COUNTS, NUM_SCALES, SOFTCAP,
                         SMOOTH, ZLOSS, ROW_WEIGHTS, ROWS)
            tl.store(g_ptrs + c.to(tl.int64) * stride_gs, d.to(ELEM), mask=st_mask)
        c += ends.to(tl.int32)
        kc = tl.where(ends, 0, kc + BLOCK_K)

    d = _dlogits(acc, last, pos64, rn, m_ok, valid, n_ok, tgt32, LSE, WT, N, V, stride_wf, stride_ws,
                 label_smoothing, lse_square_scale, softcap, COUNTS, NUM_SCALES, SOFTCAP, SMOOTH,
                 ZLOSS, ROW_WEIGHTS, ROWS)
    tl.store(g_ptrs + last * stride_gs, d.to(ELEM), mask=st_mask)
    if NUM_SCALES > 1:
        # Suffix sums in place: G_c = D_c + G_(c+1), from the last scale (in fp32) down.
        tl.debug_barrier()  # the slots are read back, possibly by other threads of the program
        for j in tl.static_range(1, NUM_SCALES):
            cc = NUM_SCALES - 1 - j
            mask = st_mask
            if ROWS:  # slots above the block's largest scale: unwritten and never read (predicated
                mask = tl.where(cc < last, mask, False)  # off, not branched around: fewer registers)
            d += tl.load(g_ptrs + cc * stride_gs, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_ptrs + cc * stride_gs, d.to(ELEM), mask=mask)


# dh[:, chain c] = alpha * G_c @ W[:, chain c]. TBL rows as in the forward. With ROWS a tile of
# positions whose rows all stop before chain c runs no K loop (its dh columns are exact zeros),
# and G_c's rows past the chain's count are masked (their slots may be unwritten).
@autotune(
    configs=GRAD_CONFIGS,
    key=["LAYOUT_KEY", "ALIGN", "ROWS"],
    prune=_dh_pruner,
)
@triton.jit(do_not_specialize=["N", "LAYOUT_KEY"])
def _mcce_bwd_dh_kernel(
    G, W, TBL, ALPHA, DH, ORDER, COUNTS,
    N, V, stride_gs, stride_gn, stride_wv, stride_dhn,
    LAYOUT_KEY,  # autotune key (pruning)
    NUM_SCALES: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    ELEM: tl.constexpr = DH.dtype.element_ty
    pid = tl.program_id(0)
    num_tiles_n = segment_tile_count(TBL + NUM_SCALES, BLOCK_N, None, 1, NUM_SCALES)
    tile_m, tile_n = grouped_tile(pid, tl.cdiv(N, BLOCK_M), num_tiles_n, GROUP_M)
    chain, tile_n, _na, _nb = find_segment(tile_n, TBL + NUM_SCALES, BLOCK_N, None, 1, NUM_SCALES)
    lo = load_int(TBL, chain, ALIGN)
    width = load_int(TBL + NUM_SCALES, chain, ALIGN)

    pos = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64, used = sorted_rows(ORDER, COUNTS, chain, pos, N, ROWS)
    rc = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = pos < N
    c_ok = rc < width
    cols = lo + rc
    a_ptrs = G + chain.to(tl.int64) * stride_gs + pos.to(tl.int64)[:, None] * stride_gn + rk[None, :]
    b_ptrs = W + rk.to(tl.int64)[:, None] * stride_wv + cols[None, :]
    k_end = tl.where(tile_m * BLOCK_M < rows_used(COUNTS, chain, N, ROWS), V, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = masked_k_loop(acc, a_ptrs, b_ptrs, used, c_ok, k_end, V, BLOCK_K, tl.cast(stride_wv, tl.int64) * BLOCK_K,
                        BLOCK_K)
    acc *= tl.load(ALPHA)
    dh_ptrs = DH + rm64[:, None] * stride_dhn + cols[None, :]
    tl.store(dh_ptrs, acc.to(ELEM), mask=m_ok[:, None] & c_ok[None, :])


# dW[:, chain c] = alpha * G_c^T @ h[:, chain c] (+ ACC when LOAD_ACC), written to OUT. With ROWS
# the K loop runs over the positions that reach chain c only (a prefix: G_c's rows in order, h's
# rows gathered through ORDER).
@autotune(
    configs=GRAD_CONFIGS,
    key=["LAYOUT_KEY", "ALIGN", "ROWS"],
    prune=_dw_pruner,
    restore_value=["OUT"],  # OUT may be ACC itself: a benchmark rerun must not add a chunk twice
)
@triton.jit(do_not_specialize=["N", "LAYOUT_KEY"])
def _mcce_bwd_dw_kernel(
    G, H, TBL, ALPHA, ACC, OUT, ORDER, COUNTS,
    N, V, stride_gs, stride_gn, stride_hn, stride_acc, stride_out,
    LAYOUT_KEY,  # autotune key (pruning)
    NUM_SCALES: tl.constexpr, LOAD_ACC: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_tiles_n = segment_tile_count(TBL + NUM_SCALES, BLOCK_N, None, 1, NUM_SCALES)
    tile_m, tile_n = grouped_tile(pid, tl.cdiv(V, BLOCK_M), num_tiles_n, GROUP_M)
    chain, tile_n, _na, _nb = find_segment(tile_n, TBL + NUM_SCALES, BLOCK_N, None, 1, NUM_SCALES)
    lo = load_int(TBL, chain, ALIGN)
    width = load_int(TBL + NUM_SCALES, chain, ALIGN)

    rv = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    v_ok = rv < V
    c_ok = rc < width
    cols = lo + rc
    rk64 = rk.to(tl.int64)
    a_ptrs = G + chain.to(tl.int64) * stride_gs + rk64[None, :] * stride_gn + rv[:, None]  # G_c^T
    b_ptrs = H + rk64[:, None] * stride_hn + cols[None, :]
    step_a = tl.cast(stride_gn, tl.int64) * BLOCK_K
    step_b = tl.cast(stride_hn, tl.int64) * BLOCK_K
    n_rows = rows_used(COUNTS, chain, N, ROWS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_rows, BLOCK_K):
        k_ok = rk < n_rows - k
        a = tl.load(a_ptrs, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        if ROWS:
            rows = tl.load(ORDER + k + rk, mask=k_ok, other=0).to(tl.int64)
            b = tl.load(H + rows[:, None] * stride_hn + cols[None, :], mask=k_ok[:, None] & c_ok[None, :],
                        other=0.0)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            b_ptrs += step_b
        acc = mma(a, b, acc)
        a_ptrs += step_a
    acc *= tl.load(ALPHA)
    rv64 = rv.to(tl.int64)
    mask = v_ok[:, None] & c_ok[None, :]
    if LOAD_ACC:
        acc += tl.load(ACC + rv64[:, None] * stride_acc + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + rv64[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _upstream_weights(grad, targets, ignore_index, reduction, row_chains=None):
    """``(wt, alpha)``: the per-scale (``(2, NS)``) or per-row (``(2, NS, N)``, ``none``) weights
    of the loss (0) and of loss + z-loss (1), divided by ``alpha = max |weight|`` (a device scalar;
    1 when that is 0 or not finite), so the workspace holds values of at most about 1."""
    g = grad.to(torch.float32)
    if g.dim() == (2 if reduction == "none" else 1):  # the loss's gradient alone (standalone use)
        g = torch.stack([g, torch.zeros_like(g)])
    if reduction == "mean":  # no row counts when the count is 0: any finite weight will do
        g = g / _n_counted(targets, ignore_index, row_chains, g.shape[1]).clamp_min(1.0)
    wt = torch.stack([g[0], g[0] + g[1]])
    alpha = wt.abs().amax() if wt.numel() else torch.ones((), device=wt.device)
    alpha = torch.where(torch.isfinite(alpha) & (alpha > 0), alpha, torch.ones_like(alpha))
    return (wt / alpha).contiguous(), alpha.reshape(1).contiguous()


def chunk_rows(n: int, ns: int, v: int, p: int, elem: int, needs_weight: bool = True) -> int:
    """Rows per chunk of the gradient workspace ``(NS, rows, V)`` (``elem`` bytes an entry):
    ``_WORKSPACE_BYTES``, grown to ``_ACC_RATIO`` x the fp32 dW accumulator ``(V, P)`` when dW is
    wanted and the rows need several chunks, in whole row blocks. Each chunk after the first
    reads and writes that accumulator once (``8 V P`` bytes), so with the ratio 2 the
    accumulator's traffic, ``8 V P (chunks - 1)``, is at most ``NS N V elem``: one write of the
    workspace over all rows, a fifth of what the gradient passes move through it."""
    unit = _row_unit()
    budget = _WORKSPACE_BYTES
    if needs_weight and ns * v * elem * n > budget:
        budget = max(budget, _ACC_RATIO * 4 * v * p)
    chunk = max(unit, budget // (ns * v * elem) // unit * unit)
    return min(chunk, max(n, 1))


def workspace(ns: int, chunk: int, v: int, dtype, device) -> torch.Tensor:
    """``(NS, chunk, V)`` in the input dtype, rows padded to a 16-byte multiple: the dh and dW
    GEMMs stream them with aligned loads whatever the vocabulary (V = 50257, say)."""
    step = max(1, 16 // torch.tensor([], dtype=dtype).element_size())
    return torch.empty((ns, chunk, triton.cdiv(v, step) * step), dtype=dtype, device=device)[:, :, :v]


def chunk_plan(plan, r0: int, rows: int):
    """``(sel, (ROWS, ORDER, COUNTS))`` of the chunk of positions ``[r0, r0 + rows)``: with ROWS the
    per-row tensors stay whole (read through the chunk's ORDER, ``sel`` is everything), else
    ``sel`` is the chunk's rows."""
    has_rows, order, counts = plan
    if has_rows:
        return slice(None), (True, order[r0:r0 + rows], (counts - r0).clamp(0, rows))
    return slice(r0, r0 + rows), plan


def grad_gemms(gbuf, h, weight, tbl, align, alpha, widths, keys, plan, rows: int, dh=None,
               dw=None, acc=None, first: bool = True, last: bool = True) -> None:
    """One chunk's ``dh = alpha G_c @ W[:, chain c]`` (into ``dh``, the chunk's rows) and
    ``dW (+)= alpha G_c^T @ h[:, chain c]``: one chunk goes straight into ``dw``; several add up in
    the fp32 ``acc`` (first: no load) and the last writes ``dw``. The dW kernel restores OUT after
    each autotuning run (restore_value), so a chunk whose launch tunes a new key is added once."""
    has_rows, order, counts = plan
    v = weight.shape[0]
    ns = gbuf.shape[0]
    dh_key, dw_key = keys
    if dh is not None:
        _mcce_bwd_dh_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * tile_count(widths, meta["BLOCK_N"]),)](
            gbuf, weight, tbl, alpha, dh, order, counts,
            rows, v, gbuf.stride(0), gbuf.stride(1), weight.stride(0), dh.stride(0),
            dh_key,
            NUM_SCALES=ns, ALIGN=_align(align, gbuf[0], weight), ROWS=has_rows,
        )
    if dw is not None:
        target = dw if last else acc
        src = dw if first else acc
        _mcce_bwd_dw_kernel[lambda meta: (triton.cdiv(v, meta["BLOCK_M"]) * tile_count(widths, meta["BLOCK_N"]),)](
            gbuf, h, tbl, alpha, src, target, order, counts,
            rows, v, gbuf.stride(0), gbuf.stride(1), h.stride(0), src.stride(0), target.stride(0),
            dw_key,
            NUM_SCALES=ns, LOAD_ACC=not first, ALIGN=_align(align, gbuf[0], h), ROWS=has_rows,
        )


def new_grads(hidden, weight, p: int, needs_hidden: bool, needs_weight: bool, dtype=None):
    """``(dh | None, dW | None)`` (``dtype``, default the inputs'): dW's columns no active scale
    reads are zeros."""
    dh = torch.empty(hidden.shape, dtype=dtype or hidden.dtype, device=hidden.device) if needs_hidden else None
    dw = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device) if needs_weight else None
    if dw is not None:
        dw[:, p:].zero_()
        if hidden.shape[0] == 0:
            dw.zero_()
    return dh, dw


def mcce_bwd(grad, hidden, weight, targets, offsets: Sequence[int], ignore_index: int,
             needs_hidden: bool = True, needs_weight: bool = True, *, lse: Optional[torch.Tensor] = None,
             reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
             softcap: float = 0.0, row_chains: Optional[torch.Tensor] = None, grad_dtype=None):
    """``(dh (N, P) | None, dW (V, D) | None)`` in the input dtype (or ``grad_dtype``) for the output's gradient
    ``grad`` (``mcce_out_shape``; without the leading 2 it is the loss's alone). ``lse`` is the
    forward's (autograd passes it); standalone callers may leave it None (one forward pass).
    ``row_chains`` (int32 ``(N,)``): row r counts in scales ``0..row_chains[r]`` only.
    Row chunks (``chunk_rows``) run in order: dlogits, dh, dW; with ``row_chains`` they are
    chunks of the rows sorted by decreasing scale."""
    offsets = [int(o) for o in offsets]
    _check(hidden, weight, targets, offsets, reduction)
    n, ns, v = hidden.shape[0], len(offsets) - 1, weight.shape[0]
    p = offsets[-1]
    dev = hidden.device
    dh, dw = new_grads(hidden, weight, p, needs_hidden, needs_weight, grad_dtype)
    if n == 0 or not (needs_hidden or needs_weight):
        return dh, dw
    plan = row_plan(row_chains, range(ns), n, dev)
    has_rows, order, _ = plan
    if lse is None:
        lse, _ = _lse_and_rows(hidden, weight, targets, offsets, ignore_index, label_smoothing,
                               lse_square_scale, softcap, row_chains)
    wt, alpha = _upstream_weights(grad, targets, ignore_index, reduction, row_chains)
    row_weights = wt.dim() == 3
    if has_rows:  # the dlogits kernel reads the per-row inputs but hidden in sorted order
        rows_sorted = order.long()
        targets, lse = targets[rows_sorted], lse[rows_sorted]
        wt = wt[:, :, rows_sorted] if row_weights else wt
    flags = _flags(label_smoothing, lse_square_scale, softcap)
    tbl, align = _chain_table(offsets, dev, hidden.element_size())
    widths = [b - a for a, b in zip(offsets, offsets[1:])]
    keys = grad_layouts(v, offsets)
    logits_key = logits_layout("dlogits", v, offsets, tuple(sorted(flags.items())), row_weights)

    chunk = chunk_rows(n, ns, v, p, hidden.element_size(), needs_weight)
    gbuf = workspace(ns, chunk, v, hidden.dtype, dev)
    starts = list(range(0, n, chunk))
    acc = None
    if needs_weight and len(starts) > 1:
        acc = torch.empty((v, p), dtype=torch.float32, device=dev)
    for i, r0 in enumerate(starts):
        rows = min(chunk, n - r0)
        chunk_pos = slice(r0, r0 + rows)  # sorted positions with has_rows, rows without
        sel, plan_c = chunk_plan(plan, r0, rows)
        _, order_c, counts_c = plan_c
        h = hidden[sel]
        w_rows = wt[:, :, chunk_pos] if row_weights else wt
        with device_guard(dev):
            _mcce_bwd_dlogits_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"])
                                                   * triton.cdiv(v, meta["BLOCK_N"]),)](
                h, weight, targets[chunk_pos], tbl, lse[chunk_pos], w_rows, gbuf, order_c, counts_c,
                rows, v, h.stride(0), weight.stride(0), gbuf.stride(0), gbuf.stride(1),
                w_rows.stride(0), w_rows.stride(1), ignore_index,
                float(label_smoothing), float(lse_square_scale), float(softcap),
                logits_key,
                NUM_SCALES=ns, ROW_WEIGHTS=row_weights, ALIGN=_align(align, h, weight), ROWS=has_rows,
                **flags,
            )
            grad_gemms(gbuf, h, weight, tbl, align, alpha, widths, keys, plan_c, rows,
                       dh=dh[sel] if needs_hidden else None, dw=dw, acc=acc, first=i == 0,
                       last=i == len(starts) - 1)
    return dh, dw
