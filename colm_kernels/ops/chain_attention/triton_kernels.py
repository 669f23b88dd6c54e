"""Triton FlashAttention-2 kernels for chain attention (KV-head packing, elastic ``seq_chains``).

Math (COLM_SPEC sections 3, 4, 6; matches ``reference.chain_attention``). Named dimensions: B
batch, Sq / Sk query / key positions, Hq query heads, Hkv kv heads, D head dim, G = Hq / Hkv query
heads per kv head. Query head ``h`` reads kv head ``kv_head_index[h]``:

    S = softmax_scale * q_h @ k_g^T   (Sq, Sk)     causal: query i sees key j iff j <= i + Sk - Sq
    O_h = softmax(S) @ v_g                          a row that sees no key outputs exact zeros

With ``seq_chains`` (B,), head ``h`` of sequence ``b`` is active iff ``head_chain[h] <=
seq_chains[b]``; inactive heads output exact zeros, get zero gradients and cost no FLOPs.

Layouts: q, out, dout, dq ``(B, Sq, Hq, D)``; k, v, dk, dv ``(B, Sk, Hkv, D)``; any strides with a
contiguous last dim (the outputs are allocated contiguous). ``lse`` and ``delta`` are fp32
``(B, Hq, Sq)`` in log2 units (``lse = log2 sum_j 2^(S_ij * log2 e)``; ``+inf`` for a row with no
visible key and for inactive heads, so their backward probabilities are exactly 0).

Variable-length packed batches (flash-attn convention, ``VARLEN`` constexpr, same kernels): q,
out, dout, dq are ``(total_q, Hq, D)``, k, v, dk, dv ``(total_k, Hkv, D)`` and lse / delta
``(Hq, total_q)``; int32 ``CU_Q`` / ``CU_K`` ``(n_seq + 1,)`` hold the sequences' first rows. The
grid's batch index is the sequence: each program reads its sequence's start offsets and lengths
in-kernel and uses them as that program's ``Sq``/``Sk`` (causal bottom-right aligned per sequence);
the launch's ``Sq``/``Sk`` are only the max lengths that size the grid (runtime ints, never
constexpr, so a new max length never recompiles). Programs whose row (key) block lies past their
sequence's length return at once; the others write exactly the rows of their sequence, so every
output row is written once (a sequence with keys but no query writes zero dK/dV).

KV-head packing. Every kv head ``g`` owns the same number G of query heads, listed (sorted by
``(head_chain, h)``) in an int32 table ``HEADS (Hkv, G)``; ``CHAINS (Hkv, G)`` holds their chains.
One program handles (batch b, kv head g, BLOCK_M packed rows), packed row ``r`` = (query position
``r // G``, group member ``r % G``): position-major, so the G heads of one position sit next to
each other (adjacent in memory for ordinary GQA) and every K/V tile is loaded once for all G
heads (no repeated K/V in HBM). Since members are sorted by chain, the active members of a group
for sequence b are a prefix of length A (computed in the kernel from ``seq_chains[b]``); the
packed order then lists the A * Sq active rows first (``r // A``, ``r % A``), then the inactive
ones. Programs whose rows are all inactive run no key loop: they write their rows' zeros (forward,
dQ) and nothing else; the dK/dV kernel iterates only over the active rows.

Kernels:
- ``_chain_attention_fwd_kernel``: grid (packed row blocks, B * Hkv), heavy blocks first; online
  softmax in fp32 with exp2; causal key loop split into a mask-free part and a masked tail.
- ``_chain_attention_bwd_preprocess_kernel``: delta = rowsum(dO * O) for the active rows.
- ``_chain_attention_bwd_dkdv_kernel``: grid (key blocks, B * Hkv); loops over the active packed
  rows (all G query heads of the kv head), so dK/dV are reduced over the group inside the kernel.
- ``_chain_attention_bwd_dq_kernel``: grid as the forward; atomics-free.
All products accumulate in fp32 (fp32 inputs use IEEE dots); outputs are written once in the
input dtype. Autotune keys: head dim, G, causal, seq_chains and varlen flags (and Triton adds the
dtypes); never a sequence length (``Sq``, ``Sk`` and the lse strides are not specialised
either). Offsets are int64.

This file holds kernels and launchers only; the ops are registered in ``triton.py``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from colm_kernels._triton.attention import active_members as _active_members
from colm_kernels._triton.utils import (
    SMEM_BUDGET,
    autotune,
    device_guard,
    int32_table,
    is_interpreter,
    is_pow2_in,
    last_dim_contiguous,
    mma,
)
from colm_kernels.ops.chain_attention.heads import (
    LOG2E,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    group_rows,
    layout_reasons,
)

__all__ = [
    "chain_attention_fwd",
    "chain_attention_bwd",
    "fwd_out_shapes",
    "group_layout",
    "layout_reasons",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
]

_MAX_GRID_Y = 65535


# ----------------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M tiles packed query rows, BLOCK_N keys.
_FWD_GPU = ((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
            (64, 32, 4, 2), (32, 32, 4, 2))
_DKDV_GPU = ((32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2),
             (16, 32, 4, 2))
_DQ_GPU = ((128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2))
_INTERPRETER = ((16, 16, 1, 1),)


def _configs(gpu) -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in (_INTERPRETER if is_interpreter() else gpu)]


def _smem_pruner(resident: str, n_resident: int, stream: str, n_stream: int, acc: str, n_acc: int):
    """Drop configs whose shared memory (``n_resident`` tiles of ``resident`` x D kept for the whole
    program, ``n_stream`` tiles of ``stream`` x D per pipeline stage) overflows the budget, or whose
    ``n_acc`` fp32 accumulators of ``acc`` x D need more than 128 registers a thread; the smallest
    survives if none fits. Depends only on head dim and dtype (autotune keys)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d, es = int(args["HEAD_DIM"]), args["Q"].element_size()
        sized = []
        for cfg in configs:
            kw = cfg.kwargs
            smem = (n_resident * kw[resident] + n_stream * kw[stream] * max(1, cfg.num_stages)) * d * es
            regs = n_acc * kw[acc] * d // (32 * cfg.num_warps)
            sized.append((smem, regs, cfg))
        fitting = [c for s, r, c in sized if s <= SMEM_BUDGET and r <= 128]
        return fitting or [min(sized, key=lambda t: (t[1], t[0]))[2]]

    return prune


_KEY = ["HEAD_DIM", "G", "CAUSAL", "HAS_SC", "VARLEN"]


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _seq_bounds(CU_Q, CU_K, b, Sq, Sk, VARLEN: tl.constexpr):
    """``(first query row, Sq, first key row, Sk)`` of sequence b: read from the cu_seqlens tables
    when VARLEN (the launch's ``Sq``/``Sk`` are then only the grid's bounds), else ``(0, Sq, 0, Sk)``."""
    q_off = b.to(tl.int64) * 0
    k_off = q_off
    if VARLEN:
        q_off = tl.load(CU_Q + b).to(tl.int64)
        Sq = (tl.load(CU_Q + b + 1).to(tl.int64) - q_off).to(tl.int32)
        k_off = tl.load(CU_K + b).to(tl.int64)
        Sk = (tl.load(CU_K + b + 1).to(tl.int64) - k_off).to(tl.int32)
    return q_off, Sq, k_off, Sk


@triton.jit
def _packed_rows(start, Sq, n_act, A, G: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SC: tl.constexpr):
    """Packed rows [start, start + BLOCK_M) -> (position, group member, active, valid).

    Active rows ``r < n_act = A * Sq`` are (r // A, r % A); the inactive rows that follow are
    (r' // (G - A), A + r' % (G - A)) with r' = r - n_act; rows >= G * Sq are invalid (member
    clamped so that table reads stay in bounds)."""
    r = start + tl.arange(0, BLOCK_M)
    valid = r < Sq * G
    if HAS_SC:
        act = r < n_act
        a = tl.maximum(A, 1)
        i = tl.maximum(G - A, 1)
        ri = r - n_act
        pos = tl.where(act, r // a, ri // i)
        mem = tl.minimum(tl.where(act, r % a, A + ri % i), G - 1)
    else:
        act = valid
        pos = r // G
        mem = r % G
    return pos, mem, act, valid


@triton.jit
def _row_ptrs(BASE, b64, pos, head, stride_b, stride_s, stride_h, offs_d):
    return (BASE + b64 * stride_b + pos.to(tl.int64)[:, None] * stride_s
            + head.to(tl.int64)[:, None] * stride_h + offs_d[None, :])


@triton.jit
def _key_range(start, n_act, A, Sq, Sk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(end of the mask-free key blocks, end of all key blocks) for the active rows of a block."""
    any_act = start < n_act
    a = tl.maximum(A, 1)
    if CAUSAL:
        pos_lo = start // a
        pos_hi = (tl.minimum(start + BLOCK_M, n_act) - 1) // a
        hi = tl.maximum(tl.minimum(Sk, pos_hi + (Sk - Sq) + 1), 0)
        full = tl.maximum(tl.minimum(Sk, pos_lo + (Sk - Sq) + 1), 0)
    else:
        hi = Sk
        full = Sk
    full = (full // BLOCK_N) * BLOCK_N
    hi = tl.where(any_act, hi, 0)
    full = tl.where(any_act, full, 0)
    return full, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, pos, start_n, end_n,
               Sq, Sk, qk_scale, offs_d,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start_n, end_n, BLOCK_N):
        cols = n0 + offs_n
        k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vs + offs_d[None, :]
        if MASK:
            k = tl.load(k_ptrs, mask=(cols < Sk)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = mma(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32)) * qk_scale
        if MASK:
            vis = (cols < Sk)[None, :]
            if CAUSAL:
                vis = vis & (cols[None, :] <= pos[:, None] + (Sk - Sq))
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_ptrs, mask=(cols < Sk)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@autotune(configs=_configs(_FWD_GPU), key=_KEY,
           prune=_smem_pruner("BLOCK_M", 1, "BLOCK_N", 2, "BLOCK_M", 1))
@triton.jit(do_not_specialize=["Sq", "Sk", "stride_lb", "stride_lh"])
def _chain_attention_fwd_kernel(
    Q, K, V, O, LSE, HEADS, CHAINS, SC, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    Sq, Sk, Hkv, qk_scale,
    HEAD_DIM: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SC: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bg = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # late (long) rows first
    q_off, Sq, k_off, Sk = _seq_bounds(CU_Q, CU_K, b, Sq, Sk, VARLEN)
    if VARLEN:
        if start >= G * Sq:  # past this sequence's rows: they belong to no program of it
            return
        Q += q_off * stride_qs
        O += q_off * stride_os
        LSE += q_off
        K += k_off * stride_ks
        V += k_off * stride_vs
    A = _active_members(SC, CHAINS, b, g, G, G_P2, HAS_SC)
    n_act = A * Sq
    pos, mem, act, valid = _packed_rows(start, Sq, n_act, A, G, BLOCK_M, HAS_SC)
    head = tl.load(HEADS + g * G + mem)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(_row_ptrs(Q, b64, pos, head, stride_qb, stride_qs, stride_qh, offs_d),
                mask=act[:, None], other=0.0)
    k_base = K + b64 * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + g.to(tl.int64) * stride_vh
    full, hi = _key_range(start, n_act, A, Sq, Sk, CAUSAL, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, pos, 0, full,
                               Sq, Sk, qk_scale, offs_d, False, CAUSAL, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, pos, full, hi,
                               Sq, Sk, qk_scale, offs_d, True, CAUSAL, BLOCK_N)

    empty = l_i == 0.0  # no visible key (or inactive): output 0, lse +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(act[:, None], out, 0.0)
    tl.store(_row_ptrs(O, b64, pos, head, stride_ob, stride_os, stride_oh, offs_d),
             out.to(O.dtype.element_ty), mask=valid[:, None])
    lse = tl.where(empty | (act == 0), float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b64 * stride_lb + head.to(tl.int64) * stride_lh + pos, lse, mask=valid)


@triton.jit(do_not_specialize=["Sq", "stride_lb", "stride_lh"])
def _chain_attention_bwd_preprocess_kernel(
    O, DO, DELTA, HEADS, CHAINS, SC, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
    Sq, Hkv,
    HEAD_DIM: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, HAS_SC: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O over the active packed rows (inactive rows are never read)."""
    pid_bg = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    start = tl.program_id(0) * BLOCK_M
    q_off, Sq, _, _ = _seq_bounds(CU_Q, CU_Q, b, Sq, Sq, VARLEN)
    if VARLEN:
        if start >= G * Sq:
            return
        O += q_off * stride_os
        DO += q_off * stride_dos
        DELTA += q_off
    A = _active_members(SC, CHAINS, b, g, G, G_P2, HAS_SC)
    pos, mem, act, valid = _packed_rows(start, Sq, A * Sq, A, G, BLOCK_M, HAS_SC)
    head = tl.load(HEADS + g * G + mem)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(_row_ptrs(O, b64, pos, head, stride_ob, stride_os, stride_oh, offs_d),
                mask=act[:, None], other=0.0)
    do = tl.load(_row_ptrs(DO, b64, pos, head, stride_dob, stride_dos, stride_doh, offs_d),
                 mask=act[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b64 * stride_lb + head.to(tl.int64) * stride_lh + pos, delta, mask=act)


@triton.jit
def _dkdv_inner(dk, dv, k, v, cols, Q, DO, LSE, DELTA, HEADS, b64, g, A, n_act,
                stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh,
                start_m, end_m, Sq, Sk, qk_scale, offs_d,
                G: tl.constexpr, HAS_SC: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr):
    for m0 in range(start_m, end_m, BLOCK_M):
        pos, mem, act, valid = _packed_rows(m0, Sq, n_act, A, G, BLOCK_M, HAS_SC)
        head = tl.load(HEADS + g * G + mem)
        q = tl.load(_row_ptrs(Q, b64, pos, head, stride_qb, stride_qs, stride_qh, offs_d),
                    mask=act[:, None], other=0.0)
        do = tl.load(_row_ptrs(DO, b64, pos, head, stride_dob, stride_dos, stride_doh, offs_d),
                     mask=act[:, None], other=0.0)
        row = b64 * stride_lb + head.to(tl.int64) * stride_lh + pos
        lse = tl.load(LSE + row, mask=act, other=float("inf"))  # +inf: probability 0
        delta = tl.load(DELTA + row, mask=act, other=0.0)
        s_t = mma(k, tl.trans(q), tl.zeros((k.shape[0], BLOCK_M), dtype=tl.float32)) * qk_scale
        if MASK:
            vis = (cols < Sk)[:, None]
            if CAUSAL:
                vis = vis & (cols[:, None] <= pos[None, :] + (Sk - Sq))
            s_t = tl.where(vis, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = mma(p_t.to(do.dtype), do, dv)
        dp_t = mma(v, tl.trans(do), tl.zeros((k.shape[0], BLOCK_M), dtype=tl.float32))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(q.dtype), q, dk)
    return dk, dv


@autotune(configs=_configs(_DKDV_GPU), key=_KEY,
           prune=_smem_pruner("BLOCK_N", 2, "BLOCK_M", 2, "BLOCK_N", 2))
@triton.jit(do_not_specialize=["Sq", "Sk", "stride_lb", "stride_lh"])
def _chain_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, HEADS, CHAINS, SC, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_lb, stride_lh,
    Sq, Sk, Hkv, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SC: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one (b, kv head, key block), summed over the active rows of all G query heads.
    A sequence with no query (varlen) still writes its keys' zeros."""
    pid_bg = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    n0 = tl.program_id(0) * BLOCK_N
    q_off, Sq, k_off, Sk = _seq_bounds(CU_Q, CU_K, b, Sq, Sk, VARLEN)
    if VARLEN:
        if n0 >= Sk:  # past this sequence's keys
            return
        Q += q_off * stride_qs
        DO += q_off * stride_dos
        LSE += q_off
        DELTA += q_off
        K += k_off * stride_ks
        V += k_off * stride_vs
        DK += k_off * stride_dks
        DV += k_off * stride_dks
    b64 = b.to(tl.int64)
    g64 = g.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = (cols < Sk)[:, None]
    k = tl.load(K + b64 * stride_kb + g64 * stride_kh + cols.to(tl.int64)[:, None] * stride_ks
                + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + b64 * stride_vb + g64 * stride_vh + cols.to(tl.int64)[:, None] * stride_vs
                + offs_d[None, :], mask=col_ok, other=0.0)
    A = _active_members(SC, CHAINS, b, g, G, G_P2, HAS_SC)
    n_act = A * Sq
    if CAUSAL:
        # rows before start_m see none of these keys; rows from mid on see all of them
        first_pos = tl.maximum(n0 - (Sk - Sq), 0)
        start_m = (first_pos * A // BLOCK_M) * BLOCK_M
        last_key = tl.minimum(n0 + BLOCK_N, Sk) - 1
        full_pos = tl.maximum(last_key - (Sk - Sq), 0)
        mid = tl.maximum(tl.cdiv(tl.minimum(full_pos * A, n_act), BLOCK_M) * BLOCK_M, start_m)
    else:
        start_m = 0
        mid = 0

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dk, dv = _dkdv_inner(dk, dv, k, v, cols, Q, DO, LSE, DELTA, HEADS, b64, g, A, n_act,
                         stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_lb,
                         stride_lh, start_m, mid, Sq, Sk, qk_scale, offs_d, G, HAS_SC, True, CAUSAL, BLOCK_M)
    # Mask-free: every key of the block is visible (keys past Sk only touch rows never stored).
    dk, dv = _dkdv_inner(dk, dv, k, v, cols, Q, DO, LSE, DELTA, HEADS, b64, g, A, n_act,
                         stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_lb,
                         stride_lh, mid, n_act, Sq, Sk, qk_scale, offs_d, G, HAS_SC, False, CAUSAL, BLOCK_M)
    out_off = b64 * stride_dkb + g64 * stride_dkh + cols.to(tl.int64)[:, None] * stride_dks + offs_d[None, :]
    tl.store(DK + out_off, (dk * softmax_scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, pos, start_n, end_n,
              Sq, Sk, qk_scale, offs_d,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start_n, end_n, BLOCK_N):
        cols = n0 + offs_n
        k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vs + offs_d[None, :]
        if MASK:
            k = tl.load(k_ptrs, mask=(cols < Sk)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(cols < Sk)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = mma(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32)) * qk_scale
        if MASK:
            vis = (cols < Sk)[None, :]
            if CAUSAL:
                vis = vis & (cols[None, :] <= pos[:, None] + (Sk - Sq))
            s = tl.where(vis, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = mma(do, tl.trans(v), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32))
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq)
    return dq


@autotune(configs=_configs(_DQ_GPU), key=_KEY,
           prune=_smem_pruner("BLOCK_M", 2, "BLOCK_N", 2, "BLOCK_M", 1))
@triton.jit(do_not_specialize=["Sq", "Sk", "stride_lb", "stride_lh"])
def _chain_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, HEADS, CHAINS, SC, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    Sq, Sk, Hkv, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SC: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bg = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    q_off, Sq, k_off, Sk = _seq_bounds(CU_Q, CU_K, b, Sq, Sk, VARLEN)
    if VARLEN:
        if start >= G * Sq:
            return
        Q += q_off * stride_qs
        DO += q_off * stride_dos
        DQ += q_off * stride_dqs
        LSE += q_off
        DELTA += q_off
        K += k_off * stride_ks
        V += k_off * stride_vs
    A = _active_members(SC, CHAINS, b, g, G, G_P2, HAS_SC)
    n_act = A * Sq
    pos, mem, act, valid = _packed_rows(start, Sq, n_act, A, G, BLOCK_M, HAS_SC)
    head = tl.load(HEADS + g * G + mem)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(_row_ptrs(Q, b64, pos, head, stride_qb, stride_qs, stride_qh, offs_d),
                mask=act[:, None], other=0.0)
    do = tl.load(_row_ptrs(DO, b64, pos, head, stride_dob, stride_dos, stride_doh, offs_d),
                 mask=act[:, None], other=0.0)
    row = b64 * stride_lb + head.to(tl.int64) * stride_lh + pos
    lse = tl.load(LSE + row, mask=act, other=float("inf"))
    delta = tl.load(DELTA + row, mask=act, other=0.0)
    k_base = K + b64 * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + g.to(tl.int64) * stride_vh
    full, hi = _key_range(start, n_act, A, Sq, Sk, CAUSAL, BLOCK_M, BLOCK_N)

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, pos, 0, full,
                   Sq, Sk, qk_scale, offs_d, False, CAUSAL, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, pos, full, hi,
                   Sq, Sk, qk_scale, offs_d, True, CAUSAL, BLOCK_N)
    dq = tl.where(act[:, None], dq * softmax_scale, 0.0)
    tl.store(_row_ptrs(DQ, b64, pos, head, stride_dqb, stride_dqs, stride_dqh, offs_d),
             dq.to(DQ.dtype.element_ty), mask=valid[:, None])


# ----------------------------------------------------------------------------------------------
# Launcher helpers
# ----------------------------------------------------------------------------------------------
def fwd_out_shapes(q: torch.Tensor, varlen: bool = False) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Shapes of ``(out, lse)``: ``(B, Sq, Hq, D)`` and ``(B, Hq, Sq)``; varlen ``(total_q, Hq, D)``
    and ``(Hq, total_q)`` (the fake uses this too)."""
    if varlen:
        total_q, Hq, _ = q.shape
        return tuple(q.shape), (Hq, total_q)
    B, Sq, Hq, _ = q.shape
    return tuple(q.shape), (B, Hq, Sq)


def group_layout(kv_head_index: Sequence[int], head_chain: Sequence[int], n_kv: int, device):
    """``(HEADS, CHAINS, G)``: int32 ``(Hkv, G)`` tables of each kv head's query heads (sorted by
    ``(chain, head)``) and their chains."""
    heads, chains = group_rows(kv_head_index, head_chain, n_kv)
    return int32_table(heads, device), int32_table(chains, device), len(heads[0])


def _check_inputs(q, k, v, kv_head_index, head_chain, seq_chains, softmax_scale,
                  cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0) -> bool:
    """Shape, dtype and device checks (no host sync: the values of ``cu_seqlens_*`` are checked by
    the public function). Returns whether the call is varlen."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    ndim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            layout = "(total, H, D) with cu_seqlens" if varlen else "(B, S, H, D)"
            raise ValueError(f"{name} must be a {ndim}-D tensor {layout}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16/bfloat16/float32")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must have q's dtype and device ({q.dtype}, {q.device})")
    if k.shape != v.shape or k.shape[-1] != q.shape[-1] or (not varlen and k.shape[0] != q.shape[0]):
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not is_pow2_in(int(q.shape[-1]), MIN_HEAD_DIM, MAX_HEAD_DIM):
        raise ValueError(f"head dim {q.shape[-1]} must be a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    reasons = layout_reasons(q.shape[-2], k.shape[-2], kv_head_index, head_chain)
    if reasons:
        raise ValueError("; ".join(reasons))
    n_seq = q.shape[0]
    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu is None:
                raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
                raise ValueError(f"{name} must be an int32 tensor of shape (n_seq + 1,), got "
                                 f"{cu.dtype} {tuple(cu.shape)}")
            if cu.device != q.device:
                raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                             f"{tuple(cu_seqlens_k.shape)} must describe the same number of sequences")
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not isinstance(m, int) or m < 0:
                raise ValueError(f"{name} must be an int >= 0, got {m!r}")
        n_seq = cu_seqlens_q.shape[0] - 1
    if seq_chains is not None:
        if seq_chains.dim() != 1 or seq_chains.shape[0] != n_seq or seq_chains.is_floating_point():
            raise ValueError(f"seq_chains must be an integer tensor of shape ({n_seq},)")
        if seq_chains.device != q.device:
            raise ValueError(f"seq_chains is on {seq_chains.device} but q is on {q.device}")
    if not softmax_scale > 0 or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")
    return varlen


def _bsh(t: torch.Tensor, varlen: bool) -> Tuple[int, int, int]:
    """(batch, position, head) strides; a packed varlen tensor has no batch dim (stride 0: the
    kernels offset by the sequence's first row instead)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _geometry(q, k, varlen, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """``(B, Sq, Sk, Hq, Hkv, (stride_lb, stride_lh))`` of a launch. Varlen: B is n_seq and Sq / Sk
    the max lengths (grid bounds; the kernels read each sequence's own from cu_seqlens); lse and
    delta are ``(Hq, total_q)``."""
    if varlen:
        B, Sq, Sk, Hq, Hkv = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, q.shape[1], k.shape[1]
        return B, Sq, Sk, Hq, Hkv, (0, q.shape[0])
    B, Sq, Hq, _ = q.shape
    return B, Sq, k.shape[1], Hq, k.shape[2], (Hq * Sq, Sq)


def _common(q, k, kv_head_index, head_chain, seq_chains, cu_seqlens_q, cu_seqlens_k, B, Hkv, varlen):
    if B * Hkv > _MAX_GRID_Y:
        raise ValueError(f"batch * kv heads = {B * Hkv} exceeds {_MAX_GRID_Y} (grid limit)")
    heads, chains, G = group_layout(kv_head_index, head_chain, Hkv, q.device)
    has_sc = seq_chains is not None
    sc = seq_chains.contiguous() if has_sc else heads  # any int tensor when unused
    cu_q = cu_seqlens_q.contiguous() if varlen else heads
    cu_k = cu_seqlens_k.contiguous() if varlen else heads
    meta = dict(HEAD_DIM=q.shape[-1], G=G, G_P2=max(2, triton.next_power_of_2(G)), HAS_SC=has_sc,
                VARLEN=varlen)
    return heads, chains, sc, cu_q, cu_k, meta


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def chain_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_head_index: Sequence[int], head_chain: Sequence[int], causal: bool,
    seq_chains: Optional[torch.Tensor], softmax_scale: float,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``(B, Sq, Hq, D)`` contiguous in q's dtype, lse fp32 ``(B, Hq, Sq)``
    (log2 units; +inf for rows with no visible key and for inactive heads). Varlen (``cu_seqlens_*``
    given): out ``(total_q, Hq, D)``, lse ``(Hq, total_q)``."""
    varlen = _check_inputs(q, k, v, kv_head_index, head_chain, seq_chains, softmax_scale,
                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out_shape, lse_shape = fwd_out_shapes(q, varlen)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    B, Sq, Sk, Hq, Hkv, lse_strides = _geometry(q, k, varlen, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if out.numel() == 0 or Sq == 0:
        return out, lse
    heads, chains, sc, cu_q, cu_k, meta = _common(q, k, kv_head_index, head_chain, seq_chains,
                                                  cu_seqlens_q, cu_seqlens_k, B, Hkv, varlen)
    G = meta["G"]

    def grid(m):
        return (triton.cdiv(G * Sq, m["BLOCK_M"]), B * Hkv)

    with device_guard(q.device):
        _chain_attention_fwd_kernel[grid](
            q, k, v, out, lse, heads, chains, sc, cu_q, cu_k,
            *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen), *lse_strides,
            Sq, Sk, Hkv, float(softmax_scale) * LOG2E,
            CAUSAL=bool(causal), **meta,
        )
    return out, lse


def chain_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    kv_head_index: Sequence[int], head_chain: Sequence[int], causal: bool,
    seq_chains: Optional[torch.Tensor], softmax_scale: float,
    need_dq: bool = True, need_dkv: bool = True,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype. ``out``/``lse`` from the forward.
    ``need_dq`` / ``need_dkv`` False: that kernel is not launched and its gradients are None."""
    varlen = _check_inputs(q, k, v, kv_head_index, head_chain, seq_chains, softmax_scale,
                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape "
                         f"{tuple(q.shape)}")
    lse_shape = fwd_out_shapes(q, varlen)[1]
    if lse.shape != lse_shape or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {lse_shape}, got {lse.dtype} {tuple(lse.shape)}")
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    dout = dout.to(q.dtype)
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if need_dq else None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if need_dkv else None
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if need_dkv else None
    B, Sq, Sk, Hq, Hkv, lse_strides = _geometry(q, k, varlen, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if q.numel() == 0 or k.numel() == 0 or not (need_dq or need_dkv):  # nothing attends: zeros
        return tuple(None if t is None else t.zero_() for t in (dq, dk, dv))
    heads, chains, sc, cu_q, cu_k, meta = _common(q, k, kv_head_index, head_chain, seq_chains,
                                                  cu_seqlens_q, cu_seqlens_k, B, Hkv, varlen)
    G = meta["G"]
    qk_scale = float(softmax_scale) * LOG2E
    delta = torch.empty_like(lse)
    pre_block = 16 if is_interpreter() else 64
    with device_guard(q.device):
        if Sq > 0:
            _chain_attention_bwd_preprocess_kernel[(triton.cdiv(G * Sq, pre_block), B * Hkv)](
                out, dout, delta, heads, chains, sc, cu_q,
                *_bsh(out, varlen), *_bsh(dout, varlen), *lse_strides,
                Sq, Hkv, BLOCK_M=pre_block, num_warps=4 if not is_interpreter() else 1,
                HEAD_DIM=meta["HEAD_DIM"], G=G, G_P2=meta["G_P2"], HAS_SC=meta["HAS_SC"], VARLEN=varlen,
            )
        if need_dkv and Sk > 0:
            _chain_attention_bwd_dkdv_kernel[lambda m: (triton.cdiv(Sk, m["BLOCK_N"]), B * Hkv)](
                q, k, v, dout, lse, delta, dk, dv, heads, chains, sc, cu_q, cu_k,
                *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
                *_bsh(dk, varlen), *lse_strides,
                Sq, Sk, Hkv, qk_scale, float(softmax_scale),
                CAUSAL=bool(causal), **meta,
            )
        if need_dq and Sq > 0:
            _chain_attention_bwd_dq_kernel[lambda m: (triton.cdiv(G * Sq, m["BLOCK_M"]), B * Hkv)](
                q, k, v, dout, lse, delta, dq, heads, chains, sc, cu_q, cu_k,
                *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
                *_bsh(dq, varlen), *lse_strides,
                Sq, Sk, Hkv, qk_scale, float(softmax_scale),
                CAUSAL=bool(causal), **meta,
            )
    return dq, dk, dv
