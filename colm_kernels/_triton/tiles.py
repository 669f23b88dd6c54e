"""Device-side (``@triton.jit``) tile helpers shared by the chain GEMM kernels.

- ``grouped_tile``: GROUP_M-swizzled (m, n) tile order for L2 reuse.
- ``segment_tile_count`` / ``find_segment``: a flat tile id -> (chain, tile within the chain), from
  per-chain extents and constexpr block sizes (a static loop over the chains).
- ``load_ptr`` / ``load_int``: a table entry as a typed pointer / int32 extent, with hints.
- ``mma``: ``tl.dot`` with fp32 accumulation, IEEE precision for fp32 inputs.
- ``masked_k_loop`` / ``tma_k_loop``: a K loop of ``mma`` steps over pointer tiles with masked loads
  / over TMA descriptor boxes.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["grouped_tile", "segment_tile_count", "find_segment", "load_ptr", "load_int", "mma", "masked_k_loop",
           "tma_k_loop"]


@triton.jit
def grouped_tile(tile_id, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """Tile id -> (tile_m, tile_n), walking GROUP_M rows of tiles column by column (L2 reuse)."""
    width = GROUP_M * num_tiles_n
    group_id = tile_id // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_tiles_m - first_m, GROUP_M)
    local = tile_id % width
    return first_m + local % group_size, local // group_size


@triton.jit
def segment_tile_count(EXT_A, BLOCK_A: tl.constexpr, EXT_B, BLOCK_B: tl.constexpr, NUM: tl.constexpr):
    """``sum_s cdiv(EXT_A[s], BLOCK_A) * cdiv(EXT_B[s], BLOCK_B)`` (EXT_B may be None)."""
    total = tl.cdiv(tl.load(EXT_A).to(tl.int32), BLOCK_A)
    if EXT_B is not None:
        total = total * tl.cdiv(tl.load(EXT_B).to(tl.int32), BLOCK_B)
    for s in tl.static_range(1, NUM):
        n = tl.cdiv(tl.load(EXT_A + s).to(tl.int32), BLOCK_A)
        if EXT_B is not None:
            n = n * tl.cdiv(tl.load(EXT_B + s).to(tl.int32), BLOCK_B)
        total += n
    return total


@triton.jit
def find_segment(tile_id, EXT_A, BLOCK_A: tl.constexpr, EXT_B, BLOCK_B: tl.constexpr, NUM: tl.constexpr):
    """Flat tile id -> (segment, tile within segment, tiles along A, tiles along B).

    Segment ``s`` owns ``cdiv(EXT_A[s], BLOCK_A) * cdiv(EXT_B[s], BLOCK_B)`` consecutive tiles
    (``EXT_B`` None: one tile along B). Segments with no tiles are never returned.
    """
    na = tl.cdiv(tl.load(EXT_A).to(tl.int32), BLOCK_A)
    nb = na * 0 + 1
    if EXT_B is not None:
        nb = tl.cdiv(tl.load(EXT_B).to(tl.int32), BLOCK_B)
    seg = na * 0
    start = na * 0
    tiles_a = na
    tiles_b = nb
    total = na * nb
    for s in tl.static_range(1, NUM):
        na = tl.cdiv(tl.load(EXT_A + s).to(tl.int32), BLOCK_A)
        if EXT_B is not None:
            nb = tl.cdiv(tl.load(EXT_B + s).to(tl.int32), BLOCK_B)
        hit = tile_id >= total
        seg = tl.where(hit, s, seg)
        start = tl.where(hit, total, start)
        tiles_a = tl.where(hit, na, tiles_a)
        tiles_b = tl.where(hit, nb, tiles_b)
        total += na * nb
    return seg, tile_id - start, tiles_a, tiles_b


@triton.jit
def load_ptr(TABLE, idx, ELEM_TY: tl.constexpr, ALIGNED: tl.constexpr):
    """Table entry ``idx`` (an int64 ``data_ptr()``) as a pointer to ``ELEM_TY``."""
    p = tl.load(TABLE + idx).to(tl.pointer_type(ELEM_TY))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def load_int(TABLE, idx, MULTIPLE: tl.constexpr):
    """Table entry ``idx`` as int32 (widths, offsets), hinted a multiple of ``MULTIPLE``."""
    v = tl.load(TABLE + idx).to(tl.int32)
    if MULTIPLE > 1:
        v = tl.multiple_of(v, MULTIPLE)
    return v


@triton.jit
def mma(a, b, acc):
    """``acc + a @ b`` with fp32 accumulation; fp32 inputs use IEEE precision (matches torch)."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def masked_k_loop(acc, a_ptrs, b_ptrs, a_ok, b_ok, k_end, k_size, step_a, step_b, BLOCK_K: tl.constexpr):
    """``acc + A @ B`` over the K steps [0, k_end) of BLOCK_K, from pointer tiles: ``a_ptrs``
    (BLOCK_M, BLOCK_K) and ``b_ptrs`` (BLOCK_K, BLOCK_N) at step 0, advanced by ``step_a`` /
    ``step_b`` per step. Rows of A outside ``a_ok``, columns of B outside ``b_ok`` and K indices
    from ``k_size`` on read zeros."""
    rk = tl.arange(0, BLOCK_K)
    for k in range(0, k_end, BLOCK_K):
        k_ok = rk < k_size - k
        a = tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & b_ok[None, :], other=0.0)
        acc = mma(a, b, acc)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


@triton.jit
def tma_k_loop(acc, a_desc, a_row, a_col, b_desc, b_row, b_col, k_end, A_K_ROWS: tl.constexpr,
               B_K_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + A @ B`` over the K steps [0, k_end) of BLOCK_K, from TMA descriptors (``tile_desc``):
    the boxes start at ``(a_row, a_col)`` / ``(b_row, b_col)`` and advance along K, which runs
    along a descriptor's rows when ``*_K_ROWS`` (the box is then (BLOCK_K, .), and A's is read
    transposed) or along its columns (the box is (., BLOCK_K), and B's is read transposed). Boxes
    past the descriptors' extents read zeros: no masks."""
    for k in range(0, k_end, BLOCK_K):
        if A_K_ROWS:
            a = a_desc.load([a_row + k, a_col]).T
        else:
            a = a_desc.load([a_row, a_col + k])
        if B_K_ROWS:
            b = b_desc.load([b_row + k, b_col])
        else:
            b = b_desc.load([b_row, b_col + k]).T
        acc = mma(a, b, acc)
    return acc

