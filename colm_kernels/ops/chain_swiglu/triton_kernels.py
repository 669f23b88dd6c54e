"""Triton kernels for the chain SwiGLU ``h = silu(x W1^T) * (x W3^T)`` (COLM_SPEC sections 2, 3).

Math. NC chains; chain i has two weights ``W1_i``, ``W3_i`` of the same shape ``(d_i, P_i)`` (d_i its
hidden width, P_i its input prefix width). With ``o_i = d_1 + ... + d_(i-1)`` and ``N = sum_i d_i``:

    a_i = x[:, :P_i] @ W1_i^T        b_i = x[:, :P_i] @ W3_i^T        (M, d_i) each
    h[:, o_i:o_i+d_i] = silu(a_i) * b_i                              x (M, K >= P_NC), h (M, N)

    backward, with dh_i = dh[:, o_i:o_i+d_i] and s = sigmoid(a):
    da = dh * b * s * (1 + a (1 - s))       db = dh * a * s           (silu(a) = a s)
    dx = sum_i da_i @ W1_i + db_i @ W3_i    dW1_i = da_i^T x[:, :P_i]    dW3_i = db_i^T x[:, :P_i]

Gate layout. ``a`` and ``b`` (what the backward needs) live in one ``(M, 2N)`` tensor ``gates``,
interleaved per chain: ``[a_1 | b_1 | a_2 | b_2 | ...]``, so chain i's ``a_i`` starts at column
``2 o_i`` and its ``b_i`` at ``2 o_i + d_i``. The same layout holds ``[da_1 | db_1 | ...]``. That is
exactly the output layout of a chain linear whose "chains" are the interleaved weight list
``[W1_1, W3_1, W1_2, W3_2, ...]`` (prefix widths ``P_1, P_1, P_2, P_2, ...``), so the backward GEMMs are
the chain-linear kernels, unchanged (``triton_backend.py`` calls their registered ops):
- ``chain_linear_bwd_dx(dgates, interleaved, K)`` sums, for input segment j, every entry >= its own
  (W1_j, W3_j, W1_(j+1), ...): ``dx = da W1 + db W3`` in ONE fp32 accumulator and one output (the
  odd, zero-width segments between a chain's two entries get no tiles);
- ``chain_linear_bwd_dw(dgates, x, interleaved, flags)`` gives ``dW1_i`` and ``dW3_i`` in one launch,
  with no tiles at all for frozen blocks.

Kernels here:
- ``_chain_swiglu_fwd_kernel``: tiles (chain i, BLOCK_N tile of d_i, BLOCK_M tile of M) over the
  nonzero blocks only; the K loop over [0, P_i) loads each x tile once and multiplies it by the
  W1_i and W3_i tiles into two fp32 accumulators; the epilogue writes ``h = silu(a) * b`` and, when
  ``STORE_GATES`` (autograd will need them), ``a`` and ``b`` too. No separate silu/mul pass.
  Its ``USE_TMA`` configs load the x, W1_i and W3_i tiles by TMA, under chain_linear's rules.
- ``_chain_swiglu_bwd_gates_kernel``: elementwise (dh, a, b) -> (da, db), fp32 math.

Dtypes: fp16, bf16 or fp32, every tensor the same; products accumulate in fp32 (IEEE dots for fp32
inputs), ``h`` is rounded once from fp32 (eager rounds a, b, silu(a) and the product separately);
``gates``/``dgates`` are stored in the input dtype, as eager autograd keeps a and b. Offsets of
token rows are int64; per-chain widths, prefixes and weight row strides must be < 2**31. Autotune
keys are the chain layout and alignment, never the token count M. M may be 0.

This file holds kernels and launchers only; the op is registered in ``triton_backend.py``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from colm_kernels._triton.autotuning import autotune
from colm_kernels._triton.device import check_tensor, device_guard, small_tiles
from colm_kernels._triton.gemm_configs import gemm_configs, make_gemm_pruner
from colm_kernels._triton.tables import int64_table, pointer_row, table_aligned, tile_count
from colm_kernels._triton.tiles import find_segment, load_int, load_ptr, mma, segment_tile_count
from colm_kernels._triton.tma import operands_tma_aligned, tma_launch_guard, tile_desc
from colm_kernels._triton.rows import row_plan, rows_used, sorted_rows
from colm_kernels.ops.chain_linear.triton_kernels import fwd_tile
from colm_kernels.ops.chain_linear.triton_launch import _align, _check_weights, _offsets, _row_stride, fwd_layout_key

__all__ = [
    "chain_swiglu_fwd",
    "chain_swiglu_bwd_gates",
    "check_pair",
    "interleave",
    "gates_shape",
]


# ----------------------------------------------------------------------------------------------
# Autotune configurations of the dual GEMM
# ----------------------------------------------------------------------------------------------
# Two fp32 accumulators per tile: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), GROUP_M 8.
# Both accumulators together get at most 64 registers per thread (measured on sm_90a: 128x64 over
# 4 warps, 128 registers of accumulators, spills 48-64 B), so 128-long tiles take 8 warps; the
# stages hold one x tile and two weight tiles. 64-wide tiles serve chain widths that are odd
# multiples of 64 (LLaMA's 11008 / 4 = 2752), where a 128-wide tile would waste 2% of its MMAs.
_H100_DUAL_GEMM = (
    (128, 64, 64, 8, 3),
    (128, 64, 64, 8, 4),
    (64, 128, 64, 8, 3),
    (64, 128, 64, 8, 4),
    (64, 64, 64, 4, 4),
    (128, 64, 32, 8, 4),  # fp32 inputs: fit shared memory where the 64-deep ones do not
    (64, 64, 32, 4, 3),
)
# TMA twins of the 16-bit rows (see ``gemm_configs``): x, W1 and W3 tiles by TMA.
_H100_DUAL_GEMM_TMA = tuple(row for row in _H100_DUAL_GEMM if row[2] == 64)
# Per-thread registers of the two accumulators together (see above).
_DUAL_MAX_ACC_REGS = 64


def dual_gemm_configs() -> List[triton.Config]:
    """Configs of the two-accumulator forward and their TMA twins; the shared 16x16x16 pair under
    the interpreter."""
    return gemm_configs(_H100_DUAL_GEMM, _H100_DUAL_GEMM_TMA)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Forward table rows (each NUM_CHAINS long): 0 W1 ptr, 1 W3 ptr, 2 d_i, 3 P_i, 4 W1 row stride,
# 5 W3 row stride, 6 o_i.
@autotune(
    configs=dual_gemm_configs(),
    key=["LAYOUT_KEY", "ALIGN", "STORE_GATES", "TMA_OPERANDS", "ROWS"],
    # two accumulators; per stage one x tile and a W1 and a W3 tile
    prune=make_gemm_pruner("X", n_acc=2, n_b=2, max_acc_regs=_DUAL_MAX_ACC_REGS),
)
@triton.jit(do_not_specialize=["LAYOUT_KEY"])
def _chain_swiglu_fwd_kernel(
    X, H, G, TBL, ORDER, COUNTS,
    M, stride_xm, stride_hm, stride_gm,
    LAYOUT_KEY,  # autotune key: the registered chain layout (pruning)
    NUM_CHAINS: tl.constexpr, STORE_GATES: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr,
    TMA_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    ELEM: tl.constexpr = X.dtype.element_ty
    tile_m, chain, tile_n = fwd_tile(TBL + 2 * NUM_CHAINS, M, NUM_CHAINS, BLOCK_M, BLOCK_N, GROUP_M)

    w1_ptr = load_ptr(TBL, chain, ELEM, ALIGN > 1)
    w3_ptr = load_ptr(TBL + 1 * NUM_CHAINS, chain, ELEM, ALIGN > 1)
    d = load_int(TBL + 2 * NUM_CHAINS, chain, ALIGN)
    p = load_int(TBL + 3 * NUM_CHAINS, chain, ALIGN)
    stride_w1 = load_int(TBL + 4 * NUM_CHAINS, chain, ALIGN).to(tl.int64)
    stride_w3 = load_int(TBL + 5 * NUM_CHAINS, chain, ALIGN).to(tl.int64)
    o = load_int(TBL + 6 * NUM_CHAINS, chain, ALIGN)

    pos = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm, used = sorted_rows(ORDER, COUNTS, chain, pos, M, ROWS)  # per-row scales: _triton/rows.py
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = pos < M
    n_ok = rn < d
    rows = rm[:, None]
    x_ptrs = X + rows * stride_xm + rk[None, :]
    w1_ptrs = w1_ptr + rn.to(tl.int64)[None, :] * stride_w1 + rk[:, None]  # W1_i^T tile (BLOCK_K, BLOCK_N)
    w3_ptrs = w3_ptr + rn.to(tl.int64)[None, :] * stride_w3 + rk[:, None]

    if USE_TMA:  # as chain_linear's forward: zeros past M rows / P_i columns / d_i rows, no masks
        tl.static_assert(ALIGN > 1 and TMA_OPERANDS and not ROWS, "TMA needs aligned operands, no ROWS")
        x_desc = tile_desc(X, M, p, stride_xm, BLOCK_M, BLOCK_K)
        w1_desc = tile_desc(w1_ptr, d, p, stride_w1, BLOCK_N, BLOCK_K)
        w3_desc = tile_desc(w3_ptr, d, p, stride_w3, BLOCK_N, BLOCK_K)

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(tile_m * BLOCK_M < rows_used(COUNTS, chain, M, ROWS), p, 0)
    for k in range(0, k_end, BLOCK_K):
        if USE_TMA:
            xt = x_desc.load([tile_m * BLOCK_M, k])  # read once, used twice
            w1t = w1_desc.load([tile_n * BLOCK_N, k]).T
            w3t = w3_desc.load([tile_n * BLOCK_N, k]).T
        else:
            k_ok = rk < p - k
            xt = tl.load(x_ptrs, mask=used[:, None] & k_ok[None, :], other=0.0)  # read once, used twice
            w1t = tl.load(w1_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            w3t = tl.load(w3_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            x_ptrs += BLOCK_K
            w1_ptrs += BLOCK_K
            w3_ptrs += BLOCK_K
        acc_a = mma(xt, w1t, acc_a)
        acc_b = mma(xt, w3t, acc_b)

    out_ok = m_ok[:, None] & n_ok[None, :]
    if ROWS:  # rows whose scale stops before this chain: exact zeros (a = b = 0 gives h = 0)
        acc_a = tl.where(used[:, None], acc_a, 0.0)
        acc_b = tl.where(used[:, None], acc_b, 0.0)
    h = acc_a * tl.sigmoid(acc_a) * acc_b
    tl.store(H + rows * stride_hm + (o + rn)[None, :], h.to(ELEM), mask=out_ok)
    if STORE_GATES:
        g_ptrs = G + rows * stride_gm + (2 * o + rn)[None, :]
        tl.store(g_ptrs, acc_a.to(ELEM), mask=out_ok)
        tl.store(g_ptrs + d, acc_b.to(ELEM), mask=out_ok)


# Gate-grad table rows (NUM_CHAINS long): 0 d_i, 1 o_i.
@triton.jit(do_not_specialize=["M"])
def _chain_swiglu_bwd_gates_kernel(
    DH, G, DG, TBL,
    M, stride_dhm, stride_gm, stride_dgm,
    NUM_CHAINS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    ELEM: tl.constexpr = DH.dtype.element_ty
    pid = tl.program_id(0)
    num_tiles_n = segment_tile_count(TBL, BLOCK_N, None, 1, NUM_CHAINS)
    tile_m = pid // num_tiles_n
    chain, tile_n, _na, _nb = find_segment(pid % num_tiles_n, TBL, BLOCK_N, None, 1, NUM_CHAINS)
    d = load_int(TBL, chain, ALIGN)
    o = load_int(TBL + NUM_CHAINS, chain, ALIGN)

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < M)[:, None] & (rn < d)[None, :]
    rows = rm.to(tl.int64)[:, None]
    g_off = rows * stride_gm + (2 * o + rn)[None, :]
    dg_off = rows * stride_dgm + (2 * o + rn)[None, :]
    dh = tl.load(DH + rows * stride_dhm + (o + rn)[None, :], mask=ok, other=0.0).to(tl.float32)
    a = tl.load(G + g_off, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(G + g_off + d, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = dh * b * s * (1.0 + a * (1.0 - s))
    db = dh * a * s
    tl.store(DG + dg_off, da.to(ELEM), mask=ok)
    tl.store(DG + dg_off + d, db.to(ELEM), mask=ok)


# ----------------------------------------------------------------------------------------------
# Launcher helpers
# ----------------------------------------------------------------------------------------------
def check_pair(w1: Sequence[torch.Tensor], w3: Sequence[torch.Tensor], *, dtype=None, device=None):
    """Validate W1/W3 blocks (same layout); return (dtype, device, d list, P list)."""
    dtype, device, ds, ps = _check_weights(w1, "w1", dtype=dtype, device=device)
    _, _, ds3, ps3 = _check_weights(w3, "w3", dtype=dtype, device=device)
    if (ds3, ps3) != (ds, ps):
        raise ValueError(
            f"w1 and w3 layouts differ: w1 blocks {[tuple(w.shape) for w in w1]}, "
            f"w3 blocks {[tuple(w.shape) for w in w3]}"
        )
    return dtype, device, ds, ps


def interleave(w1: Sequence[torch.Tensor], w3: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``[W1_1, W3_1, W1_2, W3_2, ...]``: the chain-linear layout whose output is ``gates``."""
    return [w for pair in zip(w1, w3) for w in pair]


def gates_shape(x: torch.Tensor, w1: Sequence[torch.Tensor]) -> Tuple[int, int]:
    """Shape of the saved ``[a_1 | b_1 | ...]`` tensor (the fake implementation uses it too)."""
    return (x.shape[0], 2 * sum(int(w.shape[0]) for w in w1))


def _gates_block(max_d: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the elementwise gate-grad kernel (no M in it)."""
    if small_tiles():
        return 16, 16, 1
    block_n = min(128, max(16, triton.next_power_of_2(max_d)))
    return max(16, 4096 // block_n), block_n, 4


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def chain_swiglu_fwd(x: torch.Tensor, w1: Sequence[torch.Tensor], w3: Sequence[torch.Tensor],
                     save_gates: bool, row_chains: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``h = cat_i(silu(x[:, :P_i] W1_i^T) * x[:, :P_i] W3_i^T)``: x (M, K >= P_NC) -> h (M, N).

    Returns ``(h, gates)``: ``gates`` is the ``(M, 2N)`` tensor ``[a_1 | b_1 | a_2 | b_2 | ...]`` when
    ``save_gates`` (written by the same epilogue as h), else an empty tensor (nothing written).
    ``row_chains`` (int32 ``(M,)``): per-row scales; h and the gates are exact zeros beyond them.
    """
    check_tensor("x", x, ndim=2)
    dtype, device, ds, ps = check_pair(w1, w3, dtype=x.dtype, device=x.device)
    if not isinstance(save_gates, bool):
        raise TypeError(f"save_gates must be a bool, got {type(save_gates).__name__}")
    if ps[-1] > x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the last chain reads P={ps[-1]}")
    n = len(ds)
    M, N = x.shape[0], sum(ds)
    h = torch.empty((M, N), dtype=dtype, device=device)
    gates = torch.empty(gates_shape(x, w1) if save_gates else (0,), dtype=dtype, device=device)
    if M == 0:
        return h, gates
    offs = _offsets(ds)
    s1 = [_row_stride(w) for w in w1]
    s3 = [_row_stride(w) for w in w3]
    p1 = pointer_row(w1)
    p3 = pointer_row(w3)
    tbl = int64_table([p1, p3, ds, ps, s1, s3, offs], device)
    es = x.element_size()
    aligned = table_aligned(p1 + p3, ds + ps + s1 + s3 + offs, es)

    rows, order, counts = row_plan(row_chains, range(n), M, device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * tile_count(ds, meta["BLOCK_N"]),)

    with tma_launch_guard(device):
        _chain_swiglu_fwd_kernel[grid](
            x, h, gates if save_gates else h, tbl, order, counts,
            M, x.stride(0), h.stride(0), gates.stride(0) if save_gates else 0,
            fwd_layout_key("swiglu_fwd", ds, ps),
            NUM_CHAINS=n, STORE_GATES=save_gates, ALIGN=_align(aligned, es), ROWS=rows,
            TMA_OPERANDS=operands_tma_aligned(x),
        )
    return h, gates


def chain_swiglu_bwd_gates(dh: torch.Tensor, gates: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """``[da_1 | db_1 | ...]`` (M, 2N) from ``dh`` (M, N) and ``gates`` ``[a_1 | b_1 | ...]`` (M, 2N);
    ``widths`` are the chains' hidden widths ``d_i``."""
    check_tensor("dh", dh, ndim=2)
    check_tensor("gates", gates, ndim=2, dtype=dh.dtype, device=dh.device)
    ds = [int(d) for d in widths]
    if not ds or any(d < 1 or d > 2**31 - 1 for d in ds):
        raise ValueError(f"widths must be a non-empty list of chain widths in [1, 2**31), got {list(widths)}")
    N = sum(ds)
    if dh.shape[1] != N:
        raise ValueError(f"dh has width {dh.shape[1]} but the chains' widths {ds} sum to {N}")
    if tuple(gates.shape) != (dh.shape[0], 2 * N):
        raise ValueError(
            f"gates must have shape {(dh.shape[0], 2 * N)} ([a_i | b_i] per chain), got {tuple(gates.shape)}"
        )
    M = dh.shape[0]
    dgates = torch.empty((M, 2 * N), dtype=dh.dtype, device=dh.device)
    if M == 0:
        return dgates
    offs = _offsets(ds)
    tbl = int64_table([ds, offs], dh.device)
    es = dh.element_size()
    aligned = table_aligned([], ds + offs, es)
    block_m, block_n, warps = _gates_block(max(ds))
    grid = (triton.cdiv(M, block_m) * tile_count(ds, block_n),)
    with device_guard(dh.device):
        _chain_swiglu_bwd_gates_kernel[grid](
            dh, gates, dgates, tbl,
            M, dh.stride(0), gates.stride(0), dgates.stride(0),
            NUM_CHAINS=len(ds), ALIGN=_align(aligned, es),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return dgates

