"""Launchers of the chain-linear kernels (``triton_kernels``): per-chain pointer tables, the row
plan of per-row scales, autotune layout keys and grids (the math and the tiles are documented in
``triton_kernels``). These launchers check the per-chain block lists they are handed, since the
SwiGLU backward and tests call them directly.

- ``chain_linear_fwd`` / ``chain_linear_bwd_dx`` / ``chain_linear_bwd_dw``;
- ``fwd_layout_key`` and the table helpers the SwiGLU launchers share.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton

from colm_kernels._triton.device import check_tensor, device_guard, small_tiles
from colm_kernels._triton.gemm_configs import layout_key, register_gemm_layout
from colm_kernels._triton.tables import int64_table, pointer_row, table_aligned, tile_count
from colm_kernels._triton.tma import operands_tma_aligned, tma_launch_guard
from colm_kernels._triton.rows import row_plan
from colm_kernels.ops.chain_linear.triton_kernels import (
    _chain_linear_bwd_db_kernel,
    _chain_linear_bwd_dw_kernel,
    _chain_linear_bwd_dx_kernel,
    _chain_linear_fwd_kernel,
)

__all__ = ["chain_linear_fwd", "chain_linear_bwd_dx", "chain_linear_bwd_dw", "fwd_layout_key"]

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Launcher helpers
# ----------------------------------------------------------------------------------------------
def fwd_layout_key(kind: str, ds: Sequence[int], ps: Sequence[int], *extra) -> int:
    """Autotune key of a forward-shaped GEMM (tiles of d_i along BLOCK_N, K loop over P_i), its
    layout registered for the pruner. Shared with the SwiGLU forward."""
    key = layout_key(kind, tuple(ds), tuple(ps), *extra)
    return register_gemm_layout(key, ("BLOCK_N", "BLOCK_K"), zip(ds, ps))


def _check_weights(weights, name: str = "weights", *, dtype=None, device=None):
    """Validate the per-chain weights; return (dtype, device, d list, P list)."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of 2-D tensors (one per chain)")
    ds, ps = [], []
    for i, w in enumerate(weights):
        check_tensor(f"{name}[{i}]", w, ndim=2, dtype=dtype, device=device)
        dtype, device = w.dtype, w.device
        d_i, p_i = w.shape
        if d_i < 1 or p_i < 1:
            raise ValueError(f"{name}[{i}] has shape {tuple(w.shape)}: chains need d_i >= 1 and P_i >= 1")
        if d_i > 1 and w.stride(0) < p_i:
            raise ValueError(
                f"{name}[{i}] has row stride {w.stride(0)} < P_i={p_i}: rows would overlap"
            )
        if max(d_i, p_i, w.stride(0)) > _INT32_MAX:
            raise ValueError(f"{name}[{i}]: shape {tuple(w.shape)} / row stride {w.stride(0)} must be < 2**31")
        if ps and p_i < ps[-1]:
            raise ValueError(
                f"{name}: prefix widths P_i must be non-decreasing, got "
                f"{[int(v.shape[1]) for v in weights]}"
            )
        ds.append(int(d_i))
        ps.append(int(p_i))
    return dtype, device, ds, ps


def _align(aligned: bool, element_size: int) -> int:
    """The ``ALIGN`` constexpr: elements per 16 bytes when the table is aligned, else 1 (no hints)."""
    return max(1, 16 // element_size) if aligned else 1


def _offsets(ds: Sequence[int]) -> List[int]:
    out, acc = [], 0
    for d in ds:
        out.append(acc)
        acc += d
    return out


def _row_stride(w: torch.Tensor) -> int:
    return int(w.stride(0)) if w.shape[0] > 1 else int(w.shape[1])


def _check_dy(dy, ds, dtype, device) -> None:
    check_tensor("dy", dy, ndim=2, dtype=dtype, device=device)
    if dy.shape[1] != sum(ds):
        raise ValueError(
            f"dy has width {dy.shape[1]} but the chains' output widths {ds} sum to {sum(ds)}"
        )


def _check_flags(flags, n: int, name: str) -> List[bool]:
    if isinstance(flags, (str, bytes, torch.Tensor)) or not isinstance(flags, Sequence):
        raise TypeError(f"{name} must be a sequence of {n} bools, got {type(flags).__name__}")
    if len(flags) != n:
        raise ValueError(f"{name} must have one entry per chain ({n}), got {len(flags)}")
    for f in flags:
        if not isinstance(f, bool):
            raise TypeError(f"{name} must contain bools, got {list(flags)!r}")
    return list(flags)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def chain_linear_fwd(x: torch.Tensor, weights: Sequence[torch.Tensor],
                     biases: Sequence[torch.Tensor] = (), row_chains: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """``y = cat_i(x[:, :P_i] @ W_i^T + b_i)``: x (M, K >= P_NC) -> y (M, sum d_i) in x.dtype.

    ``biases`` is empty (no bias) or one ``(d_i,)`` tensor per chain. ``row_chains`` (int32
    ``(M,)``): each row's scale; chain ``i``'s outputs are exact zeros in the rows whose scale is
    smaller (no work done for them).
    """
    check_tensor("x", x, ndim=2)
    dtype, device, ds, ps = _check_weights(weights, dtype=x.dtype, device=x.device)
    n = len(ds)
    if ps[-1] > x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the last chain reads P={ps[-1]}")
    if isinstance(biases, torch.Tensor) or not isinstance(biases, Sequence):
        raise TypeError("biases must be a sequence of 1-D tensors (one per chain) or empty")
    has_bias = len(biases) > 0
    if has_bias:
        if len(biases) != n:
            raise ValueError(f"biases must be empty or have one tensor per chain ({n}), got {len(biases)}")
        for i, (b, d_i) in enumerate(zip(biases, ds)):
            check_tensor(f"biases[{i}]", b, ndim=1, dtype=dtype, device=device)
            if b.shape[0] != d_i:
                raise ValueError(f"biases[{i}] has shape {tuple(b.shape)}, expected ({d_i},)")

    M, N = x.shape[0], sum(ds)
    y = torch.empty((M, N), dtype=dtype, device=device)
    if M == 0:
        return y
    offs = _offsets(ds)
    strides = [_row_stride(w) for w in weights]
    w_ptrs = pointer_row(weights)
    b_ptrs = pointer_row(biases) if has_bias else [0] * n
    tbl = int64_table([w_ptrs, ds, ps, strides, offs, b_ptrs], device)
    es = x.element_size()
    aligned = table_aligned(w_ptrs + (b_ptrs if has_bias else []), ds + ps + strides + offs, es)

    rows, order, counts = row_plan(row_chains, range(n), M, device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * tile_count(ds, meta["BLOCK_N"]),)

    with tma_launch_guard(device):
        _chain_linear_fwd_kernel[grid](
            x, y, tbl, order, counts,
            M, x.stride(0), y.stride(0),
            fwd_layout_key("fwd", ds, ps, has_bias),
            NUM_CHAINS=n, HAS_BIAS=has_bias, ALIGN=_align(aligned, es), ROWS=rows,
            TMA_OPERANDS=operands_tma_aligned(x),
        )
    return y


def chain_linear_bwd_dx(dy: torch.Tensor, weights: Sequence[torch.Tensor], in_features: int,
                        row_chains: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dx[:, chain j] = sum_{i >= j} dy_i @ W_i[:, chain j]``: dy (M, N) -> dx (M, in_features).

    Columns ``>= P_NC`` of dx are exact zeros (the forward's x may be wider than the chains read).
    With ``row_chains`` a row's ``dy_i`` counts only where the row reaches chain i.
    """
    check_tensor("dy", dy, ndim=2)
    dtype, device, ds, ps = _check_weights(weights, dtype=dy.dtype, device=dy.device)
    _check_dy(dy, ds, dtype, device)
    if isinstance(in_features, bool) or not isinstance(in_features, int):
        raise TypeError(f"in_features must be an int, got {type(in_features).__name__}")
    if in_features < ps[-1]:
        raise ValueError(f"in_features={in_features} is smaller than the last chain's P={ps[-1]}")
    n = len(ds)
    M = dy.shape[0]
    dx = torch.empty((M, in_features), dtype=dtype, device=device)
    if M == 0:
        return dx
    offs = _offsets(ds)
    strides = [_row_stride(w) for w in weights]
    w_ptrs = pointer_row(weights)
    seg_start = [0] + ps
    seg_width = [b - a for a, b in zip(seg_start, ps + [in_features])]
    tbl = int64_table([w_ptrs, ds, strides, offs], device)
    seg = int64_table([seg_start, seg_width], device)
    es = dy.element_size()
    aligned = table_aligned(w_ptrs, ds + strides + offs + seg_start + seg_width, es)

    rows, order, counts = row_plan(row_chains, range(n), M, device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * tile_count(seg_width, meta["BLOCK_N"]),)

    with tma_launch_guard(device):
        _chain_linear_bwd_dx_kernel[grid](
            dy, dx, tbl, seg, order, counts,
            M, dy.stride(0), dx.stride(0),
            register_gemm_layout(
                layout_key("dx", tuple(ds), tuple(ps), in_features), ("BLOCK_N", "BLOCK_K"),
                # segment j is summed over the chains i >= j (the zero tail: no product)
                [(seg_width[j], ds[i]) for j in range(n) for i in range(j, n)]),
            NUM_CHAINS=n, ALIGN=_align(aligned, es), ROWS=rows, TMA_OPERANDS=operands_tma_aligned(dy),
        )
    return dx


def _db_block(max_d: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the bias-grad column sum."""
    if small_tiles():
        return 16, 16, 1
    return 64, min(128, max(16, triton.next_power_of_2(max_d))), 4


def chain_linear_bwd_dw(
    dy: torch.Tensor,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    needs_weight_grad: Sequence[bool],
    needs_bias_grad: Sequence[bool],
    row_chains: Optional[torch.Tensor] = None,
) -> Tuple[List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]:
    """``dW_i = dy_i^T @ x[:, :P_i]`` and ``db_i = sum_m dy_i``, only for the chains that need them;
    with ``row_chains`` the sums run over the rows that reach chain i only.

    Returns ``(dW, db)``: lists with one entry per chain, ``dW_i`` a contiguous ``(d_i, P_i)``
    tensor and ``db_i`` a ``(d_i,)`` tensor in the input dtype, ``None`` where not requested.
    ``weights`` only give the layout (shapes); their values are not read.
    """
    check_tensor("dy", dy, ndim=2)
    check_tensor("x", x, ndim=2, dtype=dy.dtype, device=dy.device)
    dtype, device, ds, ps = _check_weights(weights, dtype=dy.dtype, device=dy.device)
    _check_dy(dy, ds, dtype, device)
    n = len(ds)
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but dy has {dy.shape[0]}")
    if ps[-1] > x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the last chain reads P={ps[-1]}")
    wflags = _check_flags(needs_weight_grad, n, "needs_weight_grad")
    bflags = _check_flags(needs_bias_grad, n, "needs_bias_grad")
    M = dy.shape[0]
    offs = _offsets(ds)
    es = dy.element_size()

    dws: List[Optional[torch.Tensor]] = [None] * n
    active = [i for i in range(n) if wflags[i]]
    if active:
        for i in active:
            dws[i] = torch.empty((ds[i], ps[i]), dtype=dtype, device=device)
        a_ptrs = pointer_row(dws[i] for i in active)
        a_d = [ds[i] for i in active]
        a_p = [ps[i] for i in active]
        a_o = [offs[i] for i in active]
        tbl = int64_table([a_ptrs, a_d, a_p, a_o], device)
        aligned = table_aligned(a_ptrs, a_d + a_p + a_o, es)

        rows, order, counts = row_plan(row_chains, active, M, device)

        def grid(meta):
            return (tile_count(a_d, meta["BLOCK_M"], a_p, meta["BLOCK_N"]),)

        with tma_launch_guard(device):
            _chain_linear_bwd_dw_kernel[grid](
                dy, x, tbl, order, counts,
                M, dy.stride(0), x.stride(0),
                register_gemm_layout(layout_key("dw", tuple(a_d), tuple(a_p), tuple(a_o)),
                                     ("BLOCK_M", "BLOCK_N"), zip(a_d, a_p)),
                NUM_CHAINS=len(active), ALIGN=_align(aligned, es), ROWS=rows,
                TMA_OPERANDS=operands_tma_aligned(dy, x),
            )

    dbs: List[Optional[torch.Tensor]] = [None] * n
    active = [i for i in range(n) if bflags[i]]
    if active:
        for i in active:
            dbs[i] = torch.empty((ds[i],), dtype=dtype, device=device)
        a_ptrs = pointer_row(dbs[i] for i in active)
        a_d = [ds[i] for i in active]
        a_o = [offs[i] for i in active]
        tbl = int64_table([a_ptrs, a_d, a_o], device)
        aligned = table_aligned(a_ptrs, a_d + a_o, es)
        block_m, block_n, warps = _db_block(max(a_d))
        rows, order, counts = row_plan(row_chains, active, M, device)
        with device_guard(device):
            _chain_linear_bwd_db_kernel[(tile_count(a_d, block_n),)](
                dy, tbl, order, counts, M, dy.stride(0),
                NUM_CHAINS=len(active), ALIGN=_align(aligned, es), ROWS=rows,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            )
    return dws, dbs
