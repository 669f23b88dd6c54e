"""Per-chain RMSNorm: Triton kernels and their launchers (the ``triton`` backend's math).

Math (COLM_SPEC.md section 3), per row ``r`` and chain segment ``s = [o_s, o_{s+1})`` of width
``w_s``; statistics in fp32, outputs rounded once to the input dtype (matches ``reference.py``):

    rstd[r, s] = 1 / sqrt(sum(x[r, s]^2) / w_s + eps)
    y[r, c]    = x[r, c] * rstd[r, s] * weight[c]
    backward:  xhat = x * rstd,  g = dy * weight,  m = sum_s(g * xhat) / w_s
    dx         = rstd * (g - xhat * m),   dweight = sum over rows of dy * xhat

Dimensions: ``M`` rows (tokens), ``W`` active width, ``NC`` chains (any number).

- Forward: one program per ``BLOCK_M`` rows. When the widest chain fits one ``BLOCK_N`` chunk
  (``ONE_PASS``: up to ``_ONE_PASS_WIDTH`` columns) each row segment is loaded once and stays in
  registers from its sum of squares to ``y``: x is read once. Wider chains (the fallback) take a
  pass over ``BLOCK_N`` column chunks for the sum of squares, then a pass that reads x again and
  writes ``y``. ``rstd (M, NC)`` fp32 is saved.
- Backward: a fixed grid of programs, each owning every ``n_programs``-th block of rows; ``dx``
  per row and segment (skipped when not needed); ``dweight`` as fp32 partial sums, one row per
  program of a ``(n_programs, W)`` buffer (each program owns its row: no atomics), reduced by
  ``torch.sum`` and cast once: run-to-run deterministic. Skipped when not needed (frozen gain).
  ``ONE_PASS``: per segment, the gain is read once and the partial sums stay in registers over
  the program's row blocks (one store each); x and dy are read once. The fallback reads x and dy
  twice per segment (statistics, then dx) and adds its partial sums into the zeroed buffer per
  row block. Each program takes at least ``_MIN_BWD_ROWS`` rows, so that the gain reads and
  partial-sum writes (``W * (es + 4)`` bytes a program) stay a few percent of the traffic.

Chain offsets live in a small cached int32 device table (``int32_table``) read by a runtime loop
over chains, so neither the chain count nor the token count is a compile-time key; block sizes
depend only on the largest chain width. Row offsets are int64; rows may have any row stride
(unit last-dim stride; inputs without one are copied). The ``*_shapes`` helpers give the output
shapes to both the launchers and the fake implementations.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..._triton.device import check_tensor, device_guard, last_dim_contiguous, small_tiles
from ..._triton.tables import int32_table


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _active_rows(ROW_CHAINS, rows, row_mask, s, ROWS: tl.constexpr):
    """Rows that normalise segment ``s``: every valid row, or (per-row scales) those whose scale
    reaches chain ``s``. Inactive rows read zeros, so their outputs and gradients are exact zeros
    and their masked loads move no data."""
    if ROWS:
        sc = tl.load(ROW_CHAINS + rows, mask=row_mask, other=-1)
        act = row_mask & (s <= sc)
    else:
        act = row_mask
    return act


@triton.jit
def _write_y(Y, y_rows, xv, rstd, WEIGHT, cols, col_mask, row_mask):
    wv = tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)
    yv = xv * rstd[:, None] * wv[None, :]
    tl.store(y_rows + cols[None, :], yv.to(Y.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _chain_rmsnorm_fwd_kernel(
    X, WEIGHT, Y, RSTD, OFFS, ROW_CHAINS,
    M, stride_x, stride_y, NC, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, ONE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < M
    x_rows = X + rows[:, None] * stride_x
    y_rows = Y + rows[:, None] * stride_y
    cols0 = tl.arange(0, BLOCK_N)
    for s in range(NC):
        lo = tl.load(OFFS + s)
        hi = tl.load(OFFS + s + 1)
        act = _active_rows(ROW_CHAINS, rows, row_mask, s, ROWS)
        if ONE_PASS:  # the segment is one chunk: x stays in registers from statistics to y
            cols = lo + cols0
            col_mask = cols < hi
            xv = tl.load(x_rows + cols[None, :], mask=act[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(xv * xv, axis=1) / (hi - lo).to(tl.float32) + eps)
            tl.store(RSTD + rows * NC + s, rstd, mask=row_mask)
            _write_y(Y, y_rows, xv, rstd, WEIGHT, cols, col_mask, row_mask)
        else:  # wider than a chunk: a pass for the statistics, a second one (x read again) for y
            acc = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c in range(lo, hi, BLOCK_N):
                cols = c + cols0
                mask = act[:, None] & (cols < hi)[None, :]
                xv = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(xv * xv, axis=1)
            rstd = tl.rsqrt(acc / (hi - lo).to(tl.float32) + eps)
            tl.store(RSTD + rows * NC + s, rstd, mask=row_mask)
            for c in range(lo, hi, BLOCK_N):
                cols = c + cols0
                col_mask = cols < hi
                xv = tl.load(x_rows + cols[None, :], mask=act[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
                _write_y(Y, y_rows, xv, rstd, WEIGHT, cols, col_mask, row_mask)


@triton.jit
def _dx_tile(DX, dx_rows, xhat, dyv, wv, rstd, mean, cols, col_mask, row_mask):
    dxv = rstd[:, None] * (dyv * wv[None, :] - xhat * mean[:, None])
    tl.store(dx_rows + cols[None, :], dxv.to(DX.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _chain_rmsnorm_bwd_kernel(
    DY, X, WEIGHT, RSTD, DX, DW_PART, OFFS, ROW_CHAINS,
    M, width, stride_dy, stride_x, stride_dx, NC,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NEEDS_X: tl.constexpr, NEEDS_W: tl.constexpr, ROWS: tl.constexpr, ONE_PASS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    n_iters = tl.cdiv(tl.cdiv(M, BLOCK_M) - pid, n_prog)  # row blocks pid, pid + n_prog, ...
    cols0 = tl.arange(0, BLOCK_N)
    dw_row = DW_PART + pid * width  # this program's own partial-sum row
    if ONE_PASS:
        # segments outer: the gain segment and its partial sums stay in registers over the rows
        for s in range(NC):
            lo = tl.load(OFFS + s)
            hi = tl.load(OFFS + s + 1)
            cols = lo + cols0
            col_mask = cols < hi
            wv = tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)
            dw = tl.zeros([BLOCK_N], dtype=tl.float32)
            for it in range(n_iters):
                rows = (pid + it * n_prog) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
                row_mask = rows < M
                act = _active_rows(ROW_CHAINS, rows, row_mask, s, ROWS)
                rstd = tl.load(RSTD + rows * NC + s, mask=row_mask, other=0.0)
                mask = act[:, None] & col_mask[None, :]
                xv = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dyv = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                xhat = xv * rstd[:, None]
                if NEEDS_X:
                    mean = tl.sum(dyv * wv[None, :] * xhat, axis=1) / (hi - lo).to(tl.float32)
                    _dx_tile(DX, DX + rows[:, None] * stride_dx, xhat, dyv, wv, rstd, mean, cols, col_mask, row_mask)
                if NEEDS_W:
                    dw += tl.sum(dyv * xhat, axis=0)
            if NEEDS_W:
                tl.store(dw_row + cols, dw, mask=col_mask)
    else:
        for it in range(n_iters):
            rows = (pid + it * n_prog) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
            row_mask = rows < M
            x_rows = X + rows[:, None] * stride_x
            dy_rows = DY + rows[:, None] * stride_dy
            dx_rows = DX + rows[:, None] * stride_dx
            for s in range(NC):
                lo = tl.load(OFFS + s)
                hi = tl.load(OFFS + s + 1)
                act = _active_rows(ROW_CHAINS, rows, row_mask, s, ROWS)
                rstd = tl.load(RSTD + rows * NC + s, mask=row_mask, other=0.0)
                if NEEDS_X:
                    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
                    for c in range(lo, hi, BLOCK_N):
                        cols = c + cols0
                        col_mask = cols < hi
                        mask = act[:, None] & col_mask[None, :]
                        xv = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                        dyv = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                        wv = tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)
                        acc += tl.sum(dyv * wv[None, :] * (xv * rstd[:, None]), axis=1)
                    mean = acc / (hi - lo).to(tl.float32)
                for c in range(lo, hi, BLOCK_N):
                    cols = c + cols0
                    col_mask = cols < hi
                    mask = act[:, None] & col_mask[None, :]
                    xv = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    dyv = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    xhat = xv * rstd[:, None]
                    if NEEDS_X:
                        wv = tl.load(WEIGHT + cols, mask=col_mask, other=0.0).to(tl.float32)
                        _dx_tile(DX, dx_rows, xhat, dyv, wv, rstd, mean, cols, col_mask, row_mask)
                    if NEEDS_W:
                        part = tl.load(dw_row + cols, mask=col_mask, other=0.0)
                        tl.store(dw_row + cols, part + tl.sum(dyv * xhat, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _check_offsets(offsets: Sequence[int], width: int) -> list[int]:
    offs = [int(o) for o in offsets]
    if len(offs) < 2 or offs[0] != 0 or offs[-1] != width or any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(
            f"offsets must be strictly increasing ints [0, ..., W={width}] with at least one chain, "
            f"got {offs}"
        )
    return offs


# Widest chain kept in registers whole (one pass over x); at 4096 columns a program holds one row
# (BLOCK_M 1, 8 warps: 16 fp32 values a thread per tile). Wider chains take the chunked fallback.
_ONE_PASS_WIDTH = 4096
_MIN_BWD_ROWS = 32  # rows per backward program, at least (see the module docstring)
_H100_SMS = 132  # the interpreter at the H100 tiles plans for an H100 SXM


def _blocks(offsets: Sequence[int], backward: bool = False) -> Tuple[int, int, int, bool]:
    """``(BLOCK_M, BLOCK_N, num_warps, ONE_PASS)`` from the widest chain only (never the token
    count). The backward holds x, dy and dx tiles (and their 64-bit pointers): half the rows of
    the forward's tile on as many warps (sm_90a spilled at 32 x 128 on 8 warps), but 4 warps at
    BLOCK_N 2048 (ptxas capped one variant at 64 registers on 8 warps and spilled 16 B). Every
    chain width from 16 to 8192 compiles without spills for 16- and 32-bit inputs (Triton 3.9).
    Under the interpreter small blocks keep both paths exercised: one pass up to 32 columns,
    chunks of 16 beyond."""
    max_w = max(b - a for a, b in zip(offsets, offsets[1:]))
    if small_tiles():
        return (16, max(2, triton.next_power_of_2(max_w)), 1, True) if max_w <= 32 else (16, 16, 1, False)
    one_pass = max_w <= _ONE_PASS_WIDTH
    block_n = max(16, triton.next_power_of_2(max_w) if one_pass else 1024)
    block_m = max(1, min(32, 4096 // block_n))
    warps = 4 if block_m * block_n <= 2048 else 8
    if backward:
        return max(1, min(block_m, 2048 // block_n)), block_n, 4 if block_n == 2048 else warps, one_pass
    return block_m, block_n, warps, one_pass


def x_reads_per_row(offsets: Sequence[int]) -> int:
    """Passes over each row of x (and dy) from global memory at the GPU tiles: one while the
    widest chain fits in registers, two on the chunked fallback (``bounds.py`` tells ``auto``)."""
    return 1 if max(b - a for a, b in zip(offsets, offsets[1:])) <= _ONE_PASS_WIDTH else 2


def _bwd_programs(n_row_blocks: int, rows: int, device: torch.device) -> int:
    """Programs of the backward grid: enough to fill the GPU (4 per SM), few dweight partial rows
    (at least ``_MIN_BWD_ROWS`` rows each). Under the small interpreter tiles: 4, to keep several
    programs in small tests."""
    if small_tiles():
        return max(1, min(n_row_blocks, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _H100_SMS
    return max(1, min(n_row_blocks, 4 * sms, triton.cdiv(rows, _MIN_BWD_ROWS)))


def fwd_shapes(x2d: torch.Tensor, offsets: Sequence[int]):
    """``(y, rstd)`` shapes and dtypes: ``((M, W), x.dtype), ((M, NC), float32)``."""
    m, w = x2d.shape
    return ((m, w), x2d.dtype), ((m, len(offsets) - 1), torch.float32)


def bwd_shapes(x2d: torch.Tensor, weight: torch.Tensor, needs_x: bool, needs_weight: bool):
    """``(dx, dweight)`` shapes and dtypes; a gradient not asked for is an empty ``(0,)``."""
    m, w = x2d.shape
    return ((m, w) if needs_x else (0,), x2d.dtype), ((w,) if needs_weight else (0,), weight.dtype)


def _row_chains_arg(row_chains, M: int, device):
    """``(ROWS, tensor)`` kernel arguments: the int32 per-row scales, or a placeholder."""
    if row_chains is None:
        return False, int32_table([[0]], device)
    if row_chains.dtype != torch.int32 or tuple(row_chains.shape) != (M,) or row_chains.device != device:
        raise ValueError(f"row_chains must be an int32 tensor of shape ({M},) on {device}, got "
                         f"{row_chains.dtype} {tuple(row_chains.shape)} on {row_chains.device}")
    return True, row_chains.contiguous()


def chain_rmsnorm_fwd(x2d: torch.Tensor, weight: torch.Tensor, offsets: Sequence[int],
                      eps: float, row_chains: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y (M, W), rstd (M, NC) fp32)`` for ``x2d (M, W)`` (any row stride), ``weight (W,)``;
    ``row_chains`` (int32 ``(M,)``): per-row scales, segments beyond them are exact zeros."""
    check_tensor("x2d", x2d, ndim=2, last_dim_contiguous=False)
    check_tensor("weight", weight, ndim=1, dtype=x2d.dtype, device=x2d.device, last_dim_contiguous=False)
    x2d, weight = last_dim_contiguous(x2d), last_dim_contiguous(weight)
    M, W = x2d.shape
    if weight.shape[0] != W:
        raise ValueError(f"weight has {weight.shape[0]} entries, x2d has width {W}")
    offs = _check_offsets(offsets, W)
    (y_shape, y_dtype), (r_shape, r_dtype) = fwd_shapes(x2d, offs)
    y = torch.empty(y_shape, dtype=y_dtype, device=x2d.device)
    rstd = torch.empty(r_shape, dtype=r_dtype, device=x2d.device)
    if M == 0:
        return y, rstd
    block_m, block_n, warps, one_pass = _blocks(offs)
    table = int32_table([offs], x2d.device)
    has_rows, rows = _row_chains_arg(row_chains, M, x2d.device)
    with device_guard(x2d.device):
        _chain_rmsnorm_fwd_kernel[(triton.cdiv(M, block_m),)](
            x2d, weight, y, rstd, table, rows,
            M, x2d.stride(0), y.stride(0), len(offs) - 1, float(eps),
            BLOCK_M=block_m, BLOCK_N=block_n, ROWS=has_rows, ONE_PASS=one_pass, num_warps=warps,
        )
    return y, rstd


def chain_rmsnorm_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offsets: Sequence[int], needs_x: bool, needs_weight: bool,
                      row_chains: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dx (M, W), dweight (W,))`` from ``dy``, the forward's ``x2d``, ``weight``, ``rstd``.

    A gradient not asked for (``needs_x`` / ``needs_weight`` false) is returned as an empty
    ``(0,)`` tensor and costs no work; ``dweight`` is reduced in a fixed order (deterministic).
    """
    check_tensor("x2d", x2d, ndim=2, last_dim_contiguous=False)
    check_tensor("dy", dy, ndim=2, dtype=x2d.dtype, device=x2d.device, last_dim_contiguous=False)
    check_tensor("weight", weight, ndim=1, dtype=x2d.dtype, device=x2d.device, last_dim_contiguous=False)
    dy, x2d, weight = last_dim_contiguous(dy), last_dim_contiguous(x2d), last_dim_contiguous(weight)
    M, W = x2d.shape
    offs = _check_offsets(offsets, W)
    nc = len(offs) - 1
    if dy.shape != x2d.shape or weight.shape[0] != W:
        raise ValueError(f"dy {tuple(dy.shape)} and weight {tuple(weight.shape)} must match x2d {(M, W)}")
    if rstd.shape != (M, nc) or rstd.dtype != torch.float32 or rstd.device != x2d.device:
        raise ValueError(f"rstd must be float32 {(M, nc)} on {x2d.device}, got {rstd.dtype} "
                         f"{tuple(rstd.shape)} on {rstd.device}")
    rstd = rstd.contiguous()
    (dx_shape, dx_dtype), (dw_shape, dw_dtype) = bwd_shapes(x2d, weight, needs_x, needs_weight)
    dx = torch.empty(dx_shape, dtype=dx_dtype, device=x2d.device)
    block_m, block_n, warps, one_pass = _blocks(offs, backward=True)
    programs = _bwd_programs(triton.cdiv(M, block_m), M, x2d.device)
    # one pass: every program stores its whole row; the fallback (and no launch at all) needs zeros
    alloc = torch.empty if one_pass and M > 0 else torch.zeros
    dw_part = alloc((programs if needs_weight else 0, W), dtype=torch.float32, device=x2d.device)
    if M > 0 and (needs_x or needs_weight):
        table = int32_table([offs], x2d.device)
        has_rows, rows = _row_chains_arg(row_chains, M, x2d.device)
        with device_guard(x2d.device):
            _chain_rmsnorm_bwd_kernel[(programs,)](
                dy, x2d, weight, rstd, dx if needs_x else dy, dw_part if needs_weight else rstd, table, rows,
                M, W, dy.stride(0), x2d.stride(0), dx.stride(0) if needs_x else 0, nc,
                BLOCK_M=block_m, BLOCK_N=block_n, NEEDS_X=bool(needs_x), NEEDS_W=bool(needs_weight),
                ROWS=has_rows, ONE_PASS=one_pass, num_warps=warps,
            )
    if needs_weight:
        dweight = dw_part.sum(0).to(dw_dtype)
    else:
        dweight = torch.empty(dw_shape, dtype=dw_dtype, device=x2d.device)
    return dx, dweight
