"""Triton split-K flash-decoding kernels for chain attention over a KV cache (contiguous or paged).

Math (matches ``reference.chain_attention_decode``). Named dimensions: B batch, Sq new tokens per
sequence (1..MAX_DECODE_TOKENS), S_max cache capacity per sequence, Hq query heads, Hkv kv heads
read (a prefix of the cache's heads), D head dim, G = Hq / Hkv query heads per kv head, NS splits.
``L_b = cache_seqlens[b]`` (the Sq new tokens included), clamped to ``[0, S_max]`` in the kernel.
Query head ``h`` reads kv head ``kv_head_index[h]``; query ``i`` of sequence ``b`` sees keys
``j < L_b - Sq + i + 1`` (causal, bottom-right):

    O[b, i, h] = softmax_j(softmax_scale * q[b, i, h] . k[b, j, g]) @ v[b, :, g]   (g = kv head)

a row that sees no key outputs zeros. With ``seq_chains`` head ``h`` of sequence ``b`` is active
iff ``head_chain[h] <= seq_chains[b]``: inactive heads output exact zeros and load no K/V.

Layouts: q ``(B, Sq, Hq, D)``: any strides, unit last dim. Caches, contiguous: ``(B, S_max,
Hkv_cache, D)``, key j of sequence b at ``[b, j]``; paged (flash-attn's ``block_table``
convention): ``(num_blocks, page_size, Hkv_cache, D)`` with an int32 ``block_table (B,
max_blocks)``, key j of sequence b at ``[block_table[b, j // page_size], j % page_size]``, and
``S_max = max_blocks * page_size``. Any cache strides with a unit last dim. A block-table entry is
clamped to ``[0, num_blocks)`` before it meets a stride: whatever the table holds, no read leaves
the cache. out ``(B, Sq, Hq, D)`` contiguous. Partials (split mode): ``PART_O`` fp32 ``(B, Sq * Hq,
NS, D)`` (each split's normalised output) and ``PART_LSE`` fp32 ``(B, Sq * Hq, NS)`` (log2 units,
``-inf`` for a row that sees none of the split's keys).

Head dims: every multiple of 8 in [8, 256] (``limits.DECODE_HEAD_DIMS``). The kernels compute at
``HEAD_DIM_P2``, the next power of two (at least 16, for ``tl.dot``): the padded columns are
masked on every load (read as zeros, so they add nothing to ``q . k`` and give zero output
columns) and never stored.

Kernels:
- ``_decode_split_kernel``: grid ``(NS, Hkv * row_blocks, B)``. A program owns one split of the
  keys ``[s * split_size, min((s + 1) * split_size, L_b))`` of kv head g and up to BLOCK_M packed
  rows: the Sq new tokens x the G query heads of g, active heads first (``(i, member)``, member
  sorted by chain, as in the training kernels), so every K/V tile of the split is loaded once for
  all the rows. Online softmax in fp32 (exp2); the key loop is a mask-free part and a masked
  causal tail. ``SPLIT=False`` (one split) writes ``out`` directly, zeros for inactive heads
  included; ``SPLIT=True`` writes partials, and programs whose split starts at or past ``L_b`` (or
  whose rows are all inactive) load nothing and write nothing.
- ``_decode_reduce_kernel``: grid ``(cdiv(Sq * Hq, BLOCK_R), B)``: combines the
  ``cdiv(L_b, split_size)`` valid splits of each row by their lse; zeros for inactive heads and
  rows that see no key.

The number of splits comes from the cache capacity ``S_max`` and the SM count
(``num_splits_heuristic``, a power of two), never from the lengths in the batch: it changes
neither with the step nor with the lengths, and ``split_size`` is a runtime argument. Constexprs:
head dim (and its padding), G, the seq_chains / split / paged flags and block sizes (BLOCK_M from
``G * Sq``, rounded to a power of two and capped, so more new tokens mean more row blocks, never a
larger register tile). Offsets that meet a stride are int64.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from colm_kernels._triton.attention import NOT_A_CHAIN as _NOT_A_CHAIN
from colm_kernels._triton.attention import active_members as _active_members
from colm_kernels._triton.device import device_guard, is_interpreter, last_dim_contiguous, small_tiles
from colm_kernels._triton.tables import int32_table
from colm_kernels._triton.tiles import mma
from colm_kernels.ops.chain_attention.heads import LOG2E, group_rows
from colm_kernels.ops.chain_attention.heads import layout_reasons as _layout_reasons
from colm_kernels.ops.chain_attention_decode.limits import (
    DECODE_HEAD_DIMS,
    MAX_DECODE_TOKENS,
    head_dim_reasons,
    padded_head_dim,
)

__all__ = [
    "chain_attention_decode_fwd",
    "decode_plan",
    "layout_reasons",
    "num_splits_heuristic",
    "DECODE_HEAD_DIMS",
    "MAX_DECODE_TOKENS",
]

MAX_SPLITS = 64
_MAX_GRID_YZ = 65535
# pretend SM count on CPU: with the interpreter's small tiles 4 (the heuristic then runs, with its
# small numbers); with the H100 tiles (COLM_KERNELS_TILES=gpu) the H100's 132, so the launch is the GPU's
_INTERPRETER_SMS, _H100_SMS = 4, 132


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _seq_len(SEQLENS, b, S_max):
    """``cache_seqlens[b]`` clamped to ``[0, S_max]``: never a read outside the cache."""
    n = tl.load(SEQLENS + b).to(tl.int32)
    return tl.minimum(tl.maximum(n, 0), S_max)


@triton.jit
def _cache_slots(BT, b64, cols, cols_ok, page_size, n_blocks, stride_btb,
                 PAGED: tl.constexpr, MASK: tl.constexpr):
    """``(block, slot)``, int64: key ``cols`` of sequence b sits in cache row ``[block, slot]``.
    Contiguous: ``(b, col)``. Paged: the table's block of the key's page, clamped into
    ``[0, n_blocks)`` (an unchecked table never sends a read outside the cache), and the key's
    offset in the page. ``MASK``: table entries of keys outside ``cols_ok`` are not read."""
    if PAGED:
        page = cols // page_size
        if MASK:
            blk = tl.load(BT + b64 * stride_btb + page, mask=cols_ok, other=0)
        else:
            blk = tl.load(BT + b64 * stride_btb + page)
        blk = tl.minimum(tl.maximum(blk, 0), n_blocks - 1).to(tl.int64)
        slot = (cols - page * page_size).to(tl.int64)
    else:
        blk = b64
        slot = cols.to(tl.int64)
    return blk, slot


@triton.jit
def _load_rows(ptrs, rows_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """A ``(rows, HEAD_DIM_P2)`` tile; rows outside ``rows_ok`` and the padded head-dim columns
    (``MASK_D``) read as zeros. Unmasked where nothing needs a mask (full tiles, power-of-two D)."""
    if MASK_ROWS:
        if MASK_D:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_D:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _split_inner(acc, l_i, m_i, q, k_head, v_head, BT, b64, stride_btb, page_size, n_blocks,
                 stride_kb, stride_ks, stride_vb, stride_vs, lim, lo, hi, end, qk_scale, offs_d, d_ok,
                 MASK: tl.constexpr, PAGED: tl.constexpr, MASK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks ``[lo, hi)``. ``MASK``: keys ``>= end`` are not loaded and
    row r sees key j only if ``j < lim[r]`` (causal); without it every key is visible to every row.
    ``k_head`` / ``v_head``: the caches offset to kv head g."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        in_split = cols < end
        blk, slot = _cache_slots(BT, b64, cols, in_split, page_size, n_blocks, stride_btb, PAGED, MASK)
        k_ptrs = k_head + (blk * stride_kb + slot * stride_ks)[:, None] + offs_d[None, :]
        v_ptrs = v_head + (blk * stride_vb + slot * stride_vs)[:, None] + offs_d[None, :]
        k = _load_rows(k_ptrs, in_split, d_ok, MASK, MASK_D)
        s = mma(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32)) * qk_scale
        if MASK:
            vis = in_split[None, :] & (cols[None, :] < lim[:, None])
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptrs, in_split, d_ok, MASK, MASK_D)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Sq", "S_max", "split_size", "n_splits", "page_size", "n_blocks"])
def _decode_split_kernel(
    Q, K, V, OUT, PART_O, PART_LSE, SEQLENS, SC, HEADS, CHAINS, BT,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_btb, page_size, n_blocks,
    Sq, Hq, S_max, split_size, n_splits, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr,
    HAS_SC: tl.constexpr, SPLIT: tl.constexpr, PAGED: tl.constexpr, KV_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The cache strides arrive divided by KV_ALIGN (the elements in 16 bytes, when every one is a
    # multiple of it; else 1). Multiplying back tells the compiler that K/V rows start on 16-byte
    # boundaries, so tiles are read with vector loads / cp.async for any head dim: a stride of 40
    # elements (Hkv=1, D=40) is not a multiple of 16, the only divisibility Triton infers itself.
    stride_kb, stride_ks, stride_kh = stride_kb * KV_ALIGN, stride_ks * KV_ALIGN, stride_kh * KV_ALIGN
    stride_vb, stride_vs, stride_vh = stride_vb * KV_ALIGN, stride_vs * KV_ALIGN, stride_vh * KV_ALIGN
    split = tl.program_id(0)
    n_rb = tl.cdiv(G * Sq, BLOCK_M)
    g = tl.program_id(1) // n_rb
    start_row = (tl.program_id(1) % n_rb) * BLOCK_M
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    L = _seq_len(SEQLENS, b, S_max)

    # Packed rows: active (position, member) pairs first, position-major; then inactive ones.
    A = _active_members(SC, CHAINS, b, g, G, G_P2, HAS_SC)
    n_act = A * Sq
    r = start_row + tl.arange(0, BLOCK_M)
    act = r < n_act
    ri = r - n_act
    a_div = tl.maximum(A, 1)
    i_div = tl.maximum(G - A, 1)
    pos = tl.where(act, r // a_div, ri // i_div)
    mem = tl.where(act, r % a_div, A + ri % i_div)
    valid = r < G * Sq
    head = tl.load(HEADS + g * G + mem, mask=valid, other=0)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != HEAD_DIM_P2
    row_off = pos.to(tl.int64)[:, None] * stride_os + head.to(tl.int64)[:, None] * stride_oh

    # This program's keys: [start, end). In split mode a split past L_b does no work.
    if SPLIT:
        start = split * split_size
        end = tl.minimum(start + split_size, L)
    else:
        start = split * 0
        end = L
    any_act = start_row < n_act
    work = any_act & (start < end)
    # Causal: row at position i sees keys < lim = L - Sq + i + 1. Keys below the smallest lim of
    # the block's active rows are visible to all of them (mask-free blocks).
    lim = L - Sq + pos + 1
    pos_lo = start_row // a_div
    pos_hi = (tl.minimum(start_row + BLOCK_M, n_act) - 1) // a_div
    hi = tl.minimum(end, L - Sq + pos_hi + 1)
    full = tl.minimum(hi, L - Sq + pos_lo + 1)
    full = tl.where(full > start, start + ((full - start) // BLOCK_N) * BLOCK_N, start)
    hi = tl.where(work, tl.maximum(hi, full), start)
    full = tl.where(work, full, start)

    q = _load_rows(Q + b64 * stride_qb + pos.to(tl.int64)[:, None] * stride_qs
                   + head.to(tl.int64)[:, None] * stride_qh + offs_d[None, :], act, d_ok, True, MASK_D)
    k_head = K + g.to(tl.int64) * stride_kh
    v_head = V + g.to(tl.int64) * stride_vh
    acc = tl.zeros((BLOCK_M, HEAD_DIM_P2), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _split_inner(acc, l_i, m_i, q, k_head, v_head, BT, b64, stride_btb, page_size, n_blocks,
                                 stride_kb, stride_ks, stride_vb, stride_vs, lim, start, full, end, qk_scale,
                                 offs_d, d_ok, False, PAGED, MASK_D, BLOCK_N)
    acc, l_i, m_i = _split_inner(acc, l_i, m_i, q, k_head, v_head, BT, b64, stride_btb, page_size, n_blocks,
                                 stride_kb, stride_ks, stride_vb, stride_vs, lim, full, hi, end, qk_scale,
                                 offs_d, d_ok, True, PAGED, MASK_D, BLOCK_N)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = tl.where(act[:, None], acc / l_safe[:, None], 0.0)
    if SPLIT:
        prow = (b64 * Sq + pos.to(tl.int64)) * Hq + head.to(tl.int64)  # row of (B, Sq * Hq)
        slot = prow * n_splits + split
        # A tensor, not a scalar bool: triton 3.9's interpreter rejects `tensor & scalar` masks.
        keep = act & (start + tl.zeros_like(r) < end)
        tl.store(PART_O + slot[:, None] * HEAD_DIM + offs_d[None, :], o, mask=keep[:, None] & d_ok[None, :])
        lse = tl.where(has, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(PART_LSE + slot, lse, mask=keep)
    else:
        # Active rows get their output, inactive heads their zeros.
        tl.store(OUT + b64 * stride_ob + row_off + offs_d[None, :], o.to(OUT.dtype.element_ty),
                 mask=valid[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["Sq", "S_max", "split_size", "n_splits"])
def _decode_reduce_kernel(
    PART_O, PART_LSE, OUT, SEQLENS, SC, HEAD_CHAIN,
    stride_ob, stride_os, stride_oh,
    Sq, Hq, S_max, split_size, n_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, HAS_SC: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # pos * Hq + h
    valid = rows < Sq * Hq
    pos = rows // Hq
    h = rows % Hq
    L = _seq_len(SEQLENS, b, S_max)
    n_valid = tl.minimum(tl.cdiv(L, split_size), n_splits)
    act = valid
    if HAS_SC:
        sc = tl.load(SC + b).to(tl.int32)
        ch = tl.load(HEAD_CHAIN + h, mask=valid, other=_NOT_A_CHAIN)
        act = act & (ch <= sc)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = offs_d < HEAD_DIM
    base = (b64 * Sq * Hq + rows.to(tl.int64)) * n_splits
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, HEAD_DIM_P2), dtype=tl.float32)
    for s in range(0, n_valid):
        lse = tl.load(PART_LSE + base + s, mask=act, other=float("-inf"))
        o = tl.load(PART_O + (base + s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=act[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_use)
        w = tl.math.exp2(lse - m_use)
        l = l * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    has = l > 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l, 1.0)[:, None], 0.0)
    ptrs = (OUT + b64 * stride_ob + pos.to(tl.int64)[:, None] * stride_os
            + h.to(tl.int64)[:, None] * stride_oh + offs_d[None, :])
    tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=valid[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch plan
# ----------------------------------------------------------------------------------------------
def num_splits_heuristic(programs: int, n_key_blocks: int, num_sms: int, *,
                         min_blocks_per_split: int = 1, max_splits: int = MAX_SPLITS) -> int:
    """Splits of the key axis: 1 when ``programs`` (batch x kv heads x row blocks) already fill
    80% of the SMs; else about two waves of programs, at most one split per
    ``min_blocks_per_split`` key blocks and ``max_splits``, rounded down to a power of two."""
    if programs <= 0 or n_key_blocks <= 1 or 5 * programs >= 4 * num_sms:
        return 1
    n = min(triton.cdiv(2 * num_sms, programs), n_key_blocks // max(1, min_blocks_per_split), max_splits)
    return 1 << (max(1, n).bit_length() - 1)


@functools.lru_cache(maxsize=16)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# (BLOCK_M cap, BLOCK_N, num_warps, num_stages) per padded head dim. Chosen so that no kernel
# variant spills on sm_90a: every combination of paged / split / seq_chains / padded or power-of-two
# D / BLOCK_M was compiled by Triton 3.9 (its ptxas flags) for each candidate, and the first
# candidate without a spilled byte kept. ptxas trades a few spilled bytes for occupancy at the
# register cliffs (64, 80, 128, 168), so neighbouring configs spill 8-32 B: e.g. 16-bit D=256 at
# 8 warps (BLOCK_N 32) spilled up to 32 B at 128 registers, at 4 warps with BLOCK_N 16 none (221
# registers at most). float32 tl.dot (IEEE) runs on FMA units with whole operand rows per thread:
# BLOCK_M 16 (BLOCK_M 32 spilled 700+ B at D=64). Not timed on a GPU yet.
_TILES_16BIT = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 8, 2),
                256: (32, 16, 4, 2)}
_TILES_FP32 = {16: (16, 32, 4, 2), 32: (16, 16, 4, 2), 64: (16, 16, 4, 2), 128: (16, 32, 8, 2),
               256: (16, 32, 8, 1)}


def gpu_row_block(head_dim: int, rows: int, fp32: bool) -> int:
    """BLOCK_M at the GPU tiles: the packed rows each program computes (and reads K/V for)."""
    cap = (_TILES_FP32 if fp32 else _TILES_16BIT)[head_dim][0]
    return min(max(16, triton.next_power_of_2(rows)), cap)


def _blocks(head_dim: int, rows: int, fp32: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the padded ``head_dim``. BLOCK_M: the packed
    rows ``G * Sq`` rounded up to a power of two (tl.dot needs 16), capped so that the fp32
    accumulator stays in registers (more rows: more row blocks)."""
    if small_tiles():
        return 16, 16, 1, 1
    _, block_n, warps, stages = (_TILES_FP32 if fp32 else _TILES_16BIT)[head_dim]
    return gpu_row_block(head_dim, rows, fp32), block_n, warps, stages


SPLIT_TRAFFIC = 0.10  # split-K may add at most this share to the K/V bytes a split reads


def split_min_blocks(rows: int, head_dim: int, block_n: int, fp32: bool) -> int:
    """Key blocks a split needs so that split-K's own traffic stays within ``SPLIT_TRAFFIC`` of
    the K/V it reads: each split re-reads the ``rows`` packed query rows and writes fp32 partial
    rows and lse that the reduce kernel reads back, ``rows * ((D + 1) * 4 * 2 + D * es)`` bytes,
    against ``2 * BLOCK_N * D * es`` bytes of K and V per key block. At least 2 blocks; long caches
    still split to fill the GPU (16 new tokens x 4 heads at D=128: 26 blocks of 64 keys a split), short ones
    with many rows do not, where the work is too small for the parallelism to matter."""
    es = 4 if fp32 else 2
    overhead = rows * ((head_dim + 1) * 4 * 2 + head_dim * es)
    return max(2, triton.cdiv(overhead, int(SPLIT_TRAFFIC * 2 * block_n * head_dim * es)))


def decode_plan(batch: int, n_kv: int, rows: int, s_max: int, head_dim: int, device,
                num_splits: Optional[int] = None, fp32: bool = False) -> dict:
    """Block sizes and the split of the key axis for one launch (``head_dim``: the padded one,
    ``s_max``: keys per sequence the cache holds). ``num_splits`` forces a split count (tests);
    the split size is then ``cdiv(key blocks, num_splits)`` key blocks."""
    block_m, block_n, warps, stages = _blocks(head_dim, rows, fp32)
    n_rb = triton.cdiv(rows, block_m)
    n_blocks = max(1, triton.cdiv(s_max, block_n))
    if num_splits is None:
        if device.type == "cuda":
            sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
            min_blocks = split_min_blocks(rows, head_dim, block_n, fp32)
        elif small_tiles():  # tiny interpreter caches still split
            sms, min_blocks = _INTERPRETER_SMS, 1
        else:
            sms, min_blocks = _H100_SMS, split_min_blocks(rows, head_dim, block_n, fp32)
        num_splits = num_splits_heuristic(batch * n_kv * n_rb, n_blocks, sms, min_blocks_per_split=min_blocks)
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    split_blocks = triton.cdiv(n_blocks, min(num_splits, n_blocks))
    split_size = split_blocks * block_n
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                row_blocks=n_rb, split_size=split_size, num_splits=triton.cdiv(n_blocks, split_blocks))


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def layout_reasons(n_q: int, n_kv: int, kv_head_index: Sequence[int], head_chain: Sequence[int]) -> List[str]:
    """Why the kernels cannot pack this head mapping (empty: they can); they read the kv heads
    ``0 .. max(kv_head_index)``, a prefix of the cache's ``n_kv``."""
    return _layout_reasons(n_q, n_kv, kv_head_index, head_chain, kv_prefix=True)


def _check_inputs(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains, softmax_scale,
                  block_table):
    """What the kernels rely on (the public function checks more, and names the arguments)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16/bfloat16/float32")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must have q's dtype and device ({q.dtype}, {q.device})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    B, Sq, Hq, D = q.shape
    paged = block_table is not None
    if (k_cache.shape != v_cache.shape or k_cache.shape[3] != D
            or (not paged and k_cache.shape[0] != B)):
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if paged:
        if (block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B
                or block_table.device != q.device):
            raise ValueError(f"block_table must be an int32 ({B}, max_blocks) tensor on {q.device}, got "
                             f"{block_table.dtype} {tuple(block_table.shape)} on {block_table.device}")
        if k_cache.shape[1] < 1 or k_cache.shape[0] < 1:
            raise ValueError(f"a paged cache needs page_size >= 1 and num_blocks >= 1, got k_cache "
                             f"{tuple(k_cache.shape)}")
    if not 1 <= Sq <= MAX_DECODE_TOKENS:
        raise ValueError(f"q.shape[1]={Sq} new tokens must be in [1, {MAX_DECODE_TOKENS}]")
    reasons = head_dim_reasons("triton", int(D)) + layout_reasons(Hq, k_cache.shape[2], kv_head_index, head_chain)
    if reasons:
        raise ValueError("; ".join(reasons))
    for name, t in (("cache_seqlens", cache_seqlens), ("seq_chains", seq_chains)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != B or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of shape ({B},)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not softmax_scale > 0 or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")


def _kv_align(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Elements per 16 bytes when every cache stride (batch or block, position, head) is a
    multiple of it, else 1: what ``KV_ALIGN`` may promise the compiler."""
    vec = 16 // k_cache.element_size()
    ok = all(s % vec == 0 for t in (k_cache, v_cache) for s in t.stride()[:3])
    return vec if ok and not is_interpreter() else 1


def cache_capacity(k_cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> int:
    """Keys each sequence can hold: ``S_max`` of a contiguous cache, ``max_blocks * page_size`` of
    a paged one."""
    return int(k_cache.shape[1]) * (1 if block_table is None else int(block_table.shape[1]))


def chain_attention_decode_fwd(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    kv_head_index: Sequence[int], head_chain: Sequence[int], seq_chains: Optional[torch.Tensor],
    softmax_scale: float, block_table: Optional[torch.Tensor] = None, *, num_splits: Optional[int] = None,
) -> torch.Tensor:
    """``out (B, Sq, Hq, D)``, contiguous, in q's dtype. ``block_table``: None (contiguous cache)
    or the paged cache's int32 ``(B, max_blocks)`` table. ``num_splits`` forces the number of
    splits of the key axis (default: ``num_splits_heuristic``)."""
    _check_inputs(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains, softmax_scale,
                  block_table)
    q = last_dim_contiguous(q)
    B, Sq, Hq, D = q.shape
    D_P2 = padded_head_dim(D)
    S_max = cache_capacity(k_cache, block_table)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    heads, chains = group_rows(kv_head_index, head_chain)
    Hkv, G = len(heads), len(heads[0])
    plan = decode_plan(B, Hkv, G * Sq, S_max, D_P2, q.device, num_splits, q.dtype == torch.float32)
    n_splits, n_rb = plan["num_splits"], plan["row_blocks"]
    if B > _MAX_GRID_YZ or Hkv * n_rb > _MAX_GRID_YZ:
        raise ValueError(f"batch {B} and kv heads x row blocks {Hkv * n_rb} must be <= {_MAX_GRID_YZ} (grid limit)")
    heads_t, chains_t = int32_table(heads, q.device), int32_table(chains, q.device)
    seqlens = cache_seqlens.contiguous()
    has_sc = seq_chains is not None
    sc = seq_chains.contiguous() if has_sc else seqlens  # any int tensor when unused
    paged = block_table is not None
    if paged:
        table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        page_size, n_blocks, stride_btb = k_cache.shape[1], k_cache.shape[0], table.stride(0)
    else:
        table, page_size, n_blocks, stride_btb = seqlens, 1, 1, 0  # unused
    split = n_splits > 1
    if split:
        part_o = torch.empty((B, Sq * Hq, n_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Sq * Hq, n_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    meta = dict(HEAD_DIM=D, HEAD_DIM_P2=D_P2, HAS_SC=has_sc)
    align = _kv_align(k_cache, v_cache)
    with device_guard(q.device):
        _decode_split_kernel[(n_splits, Hkv * n_rb, B)](
            q, k_cache, v_cache, out, part_o, part_lse, seqlens, sc, heads_t, chains_t, table,
            q.stride(0), q.stride(1), q.stride(2),
            *(s // align for s in k_cache.stride()[:3]), *(s // align for s in v_cache.stride()[:3]),
            out.stride(0), out.stride(1), out.stride(2),
            stride_btb, page_size, n_blocks,
            Sq, Hq, S_max, plan["split_size"], n_splits, float(softmax_scale) * LOG2E,
            G=G, G_P2=max(2, triton.next_power_of_2(G)), SPLIT=split, PAGED=paged, KV_ALIGN=align,
            BLOCK_M=plan["BLOCK_M"], BLOCK_N=plan["BLOCK_N"],
            num_warps=plan["num_warps"], num_stages=plan["num_stages"], **meta,
        )
        if split:
            block_r = 16 if small_tiles() else max(1, min(64, 4096 // D_P2))
            head_chain_t = int32_table([list(head_chain)], q.device)
            _decode_reduce_kernel[(triton.cdiv(Sq * Hq, block_r), B)](
                part_o, part_lse, out, seqlens, sc, head_chain_t,
                out.stride(0), out.stride(1), out.stride(2),
                Sq, Hq, S_max, plan["split_size"], n_splits,
                BLOCK_R=block_r, num_warps=1 if small_tiles() else 4, **meta,
            )
    return out
