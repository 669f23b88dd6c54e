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
visible key and for inactive heads, so their backward probabilities are exactly 0). D is any
multiple of 8 in [8, 256]: tiles are padded to a power of two (``triton_tiles``).

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
ones. Programs whose rows are all inactive run no key loop: they write their rows' zeros (forward)
and nothing else; the backward iterates only over the active rows.

Kernels:
- ``_chain_attention_fwd_kernel``: grid (packed row blocks, B * Hkv), heavy blocks first; online
  softmax in fp32 with exp2. Keys every row of the block sees run mask-free on BLOCK_N-wide tiles,
  then SUB_N-wide ones; causal: the diagonal runs per sub-block of SUB_M rows (masked).
- ``_chain_attention_bwd_preprocess_kernel``: delta = rowsum(dO * O) for the active rows.
- ``_chain_attention_bwd_kernel``: grid (key blocks, B * Hkv), FlashAttention-2's backward. Each
  program loads its K/V tile once and loops over the active packed rows (all G query heads of the
  kv head, so dK/dV are reduced over the group in registers): 5 matmuls per tile (S^T = K Q^T
  recomputed, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q and, with ``DQ_ATOMIC``, dQ += dS K added
  by fp32 atomics into a zeroed buffer the launcher casts; computed as dQ^T = K^T dS^T where the
  head dim is 64 or more, so that its M is a warpgroup tile, not the step's few rows). Causal:
  rows that see the whole key block run mask-free; the diagonal runs per SUB_N-key sub-block over
  SUB_M-row steps.
- ``_chain_attention_bwd_dq_kernel``: the deterministic path's dQ (grid as the forward): a second
  pass that recomputes S and dP per (row block, key block), so no two programs write one dQ row
  (``deterministic=True``; then the kernel above runs without ``DQ_ATOMIC``). It also serves a
  backward that needs dQ only (frozen K/V).
All products accumulate in fp32 (fp32 inputs use IEEE dots); outputs are written once in the
input dtype.

TMA (``USE_TMA`` config knob of the forward and the dQ pass, the autotuner's choice on sm_90+):
the same tiles and math, but the K / V tiles these kernels stream come from device-side tensor
descriptors (``triton_tiles.key_source``) over the program's (sequence, kv head) slice: ``Sk``
rows (varlen: the sequence's own) of row stride ``stride_ks``, ``HEAD_DIM`` columns, read in
(BLOCK_N or SUB_N, HEAD_DIM_P2) boxes whose zero fill past Sk and past the head dim replaces the
masks. Legal for 16-bit inputs whose K and V bases and strides are 16-byte multiples (``TMA_KV``,
an autotune key); the pruners offer the TMA twins only then and the launchers set Triton's scratch
allocator on CUDA. Q, dO and every output still go through pointers: the packed rows are a
gather across the G query heads through ``HEADS``. The key-block backward has no TMA twin: it
loads its K / V tile once per program (nothing to pipeline) and streams those gathered rows.
Autotune keys: head dim, G, causal, seq_chains and varlen flags (``TMA_KV`` for the forward and
the dQ pass; Triton adds the dtypes); never a sequence length (``Sq``, ``Sk`` and the lse strides
are not specialised either). Offsets are int64.

This file holds the kernels only: their launchers are in ``triton_launch``, tiles and configs in
``triton_tiles``, the ops' registration in ``triton_backend``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from colm_kernels._triton.attention import active_members as _active_members
from colm_kernels._triton.autotuning import autotune
from colm_kernels._triton.tiles import mma
from colm_kernels.ops.chain_attention.triton_tiles import (
    AUTOTUNE_KEY,
    WGMMA_M,
    bwd_configs,
    tile_mask_t,
    row_ptrs_t,
    dq_configs,
    fwd_configs,
    stack_rows,
    hint_strides,
    kv_sources,
    load_grad_rows,
    load_keys,
    load_tile,
    packed_rows,
    prune_bwd,
    prune_dq,
    prune_fwd,
    row_ptrs,
    program_block,
    tile_mask,
    visible_keys,
)

__all__ = ["_chain_attention_fwd_kernel", "_chain_attention_bwd_preprocess_kernel", "_chain_attention_bwd_kernel",
           "_chain_attention_bwd_dq_kernel"]


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_keys(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, pos, start_n, end_n,
              Sq, Sk, qk_scale, offs_d,
              HEAD_DIM: tl.constexpr, PAD: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
              BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax of the rows of ``q`` over keys [start_n, end_n) in BLOCK_N-wide steps of the
    ``key_source``s k_src / v_src; ``MASK``: keys past Sk and (causal) past each row's diagonal
    are masked."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start_n, end_n, BLOCK_N):
        cols = n0 + offs_n
        ok = cols < Sk
        k = load_keys(k_src, n0, cols, ok, stride_ks, offs_d, HEAD_DIM, PAD, MASK, USE_TMA)
        s = mma(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32)) * qk_scale
        if MASK:
            vis = ok[None, :]
            if CAUSAL:
                vis = vis & (cols[None, :] <= pos[:, None] + (Sk - Sq))
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_keys(v_src, n0, cols, ok, stride_vs, offs_d, HEAD_DIM, PAD, MASK, USE_TMA)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_store(acc, l_i, m_i, pos, head, act, valid, O, LSE, b64, stride_ob, stride_os, stride_oh,
               stride_lb, stride_lh, offs_d, HEAD_DIM: tl.constexpr, PAD: tl.constexpr):
    empty = l_i == 0.0  # no visible key (or inactive): output 0, lse +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(act[:, None], out, 0.0)
    tl.store(row_ptrs(O, b64, pos, head, stride_ob, stride_os, stride_oh, offs_d),
             out.to(O.dtype.element_ty), mask=tile_mask(valid, offs_d, HEAD_DIM, PAD))
    lse = tl.where(empty | (act == 0), float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b64 * stride_lb + head.to(tl.int64) * stride_lh + pos, lse, mask=valid)


@triton.jit
def _fwd_diagonal(Q, HEADS, k_src, v_src, b64, g, start, A, n_act, stride_qb, stride_qs, stride_qh,
                  stride_ks, stride_vs, first_key, Sq, Sk, qk_scale, offs_d,
                  G: tl.constexpr, HAS_SC: tl.constexpr, HEAD_DIM: tl.constexpr, PAD: tl.constexpr,
                  N_SUB: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Online-softmax state ``(acc, l, m)`` of packed rows [start, start + N_SUB * SUB_M) over the
    causal diagonal's keys [first_key, each row's last key], one SUB_M-row sub-block at a time up
    to its own last key; halves are built recursively and stacked, so no tile is held twice."""
    if N_SUB == 1:
        pos, mem, act, valid = packed_rows(start, Sq, n_act, A, G, SUB_M, HAS_SC)
        head = tl.load(HEADS + g * G + mem)
        q = load_tile(row_ptrs(Q, b64, pos, head, stride_qb, stride_qs, stride_qh, offs_d), act, offs_d,
                      HEAD_DIM, PAD, True)
        _, hi = visible_keys(start, n_act, A, Sq, Sk, True, SUB_M)
        acc = tl.zeros((SUB_M, offs_d.shape[0]), dtype=tl.float32)
        l_i = tl.zeros((SUB_M,), dtype=tl.float32)
        m_i = tl.full((SUB_M,), float("-inf"), dtype=tl.float32)
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, pos, first_key, hi,
                                  Sq, Sk, qk_scale, offs_d, HEAD_DIM, PAD, True, True, SUB_N, USE_TMA)
    else:
        acc_a, l_a, m_a = _fwd_diagonal(Q, HEADS, k_src, v_src, b64, g, start, A, n_act, stride_qb,
                                        stride_qs, stride_qh, stride_ks, stride_vs, first_key, Sq, Sk,
                                        qk_scale, offs_d, G, HAS_SC, HEAD_DIM, PAD, N_SUB // 2, SUB_M, SUB_N,
                                        USE_TMA)
        acc_b, l_b, m_b = _fwd_diagonal(Q, HEADS, k_src, v_src, b64, g, start + (N_SUB // 2) * SUB_M, A,
                                        n_act, stride_qb, stride_qs, stride_qh, stride_ks, stride_vs,
                                        first_key, Sq, Sk, qk_scale, offs_d, G, HAS_SC, HEAD_DIM, PAD,
                                        N_SUB // 2, SUB_M, SUB_N, USE_TMA)
        acc = stack_rows(acc_a, acc_b)
        l_i = stack_rows(l_a, l_b)
        m_i = stack_rows(m_a, m_b)
    return acc, l_i, m_i


@autotune(configs=fwd_configs(), key=AUTOTUNE_KEY + ["TMA_KV"], prune=prune_fwd)
@triton.jit(do_not_specialize=["Sq", "Sk", "stride_lb", "stride_lh"])
def _chain_attention_fwd_kernel(
    Q, K, V, O, LSE, HEADS, CHAINS, SC, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    Sq, Sk, Hkv, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, ALIGN: tl.constexpr, G: tl.constexpr,
    G_P2: tl.constexpr, CAUSAL: tl.constexpr, HAS_SC: tl.constexpr, VARLEN: tl.constexpr,
    TMA_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAG: tl.constexpr, SUB_M: tl.constexpr,
    SUB_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    PAD: tl.constexpr = HEAD_DIM != HEAD_DIM_P2
    tl.static_assert(TMA_KV or not USE_TMA, "TMA needs K / V bases and strides that are 16-byte multiples")
    stride_qb, stride_qs, stride_qh = hint_strides(stride_qb, stride_qs, stride_qh, ALIGN)
    stride_kb, stride_ks, stride_kh = hint_strides(stride_kb, stride_ks, stride_kh, ALIGN)
    stride_vb, stride_vs, stride_vh = hint_strides(stride_vb, stride_vs, stride_vh, ALIGN)
    stride_ob, stride_os, stride_oh = hint_strides(stride_ob, stride_os, stride_oh, ALIGN)
    b, g, start, q_off, Sq, k_off, Sk = program_block(CU_Q, CU_K, Sq, Sk, Hkv, BLOCK_M, True, VARLEN)
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
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    # K / V tiles of BLOCK_N keys (the bulk) and of SUB_N keys (the diagonal and the tail)
    k_blk, v_blk = kv_sources(K, V, b64, g, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, Sk,
                              HEAD_DIM, HEAD_DIM_P2, BLOCK_N, USE_TMA)
    if SUB_N == BLOCK_N:
        k_sub = k_blk
        v_sub = v_blk
    else:
        k_sub, v_sub = kv_sources(K, V, b64, g, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                  Sk, HEAD_DIM, HEAD_DIM_P2, SUB_N, USE_TMA)
    lo, hi = visible_keys(start, n_act, A, Sq, Sk, CAUSAL, BLOCK_M)
    bulk_end = (lo // BLOCK_N) * BLOCK_N
    shared_end = (lo // SUB_N) * SUB_N  # keys [0, lo) are visible to every active row

    if CAUSAL:  # the diagonal first (softmax order is free), per sub-block of SUB_M rows
        acc, l_i, m_i = _fwd_diagonal(Q, HEADS, k_sub, v_sub, b64, g, start, A, n_act, stride_qb, stride_qs,
                                      stride_qh, stride_ks, stride_vs, shared_end, Sq, Sk, qk_scale, offs_d,
                                      G, HAS_SC, HEAD_DIM, PAD, BLOCK_M // SUB_M, SUB_M, SUB_N, USE_TMA)
    else:
        acc = tl.zeros((BLOCK_M, HEAD_DIM_P2), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    pos, mem, act, valid = packed_rows(start, Sq, n_act, A, G, BLOCK_M, HAS_SC)
    head = tl.load(HEADS + g * G + mem)
    q = load_tile(row_ptrs(Q, b64, pos, head, stride_qb, stride_qs, stride_qh, offs_d), act, offs_d,
                  HEAD_DIM, PAD, True)
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_blk, v_blk, stride_ks, stride_vs, pos, 0, bulk_end,
                              Sq, Sk, qk_scale, offs_d, HEAD_DIM, PAD, False, CAUSAL, BLOCK_N, USE_TMA)
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_sub, v_sub, stride_ks, stride_vs, pos, bulk_end,
                              shared_end, Sq, Sk, qk_scale, offs_d, HEAD_DIM, PAD, False, CAUSAL, SUB_N, USE_TMA)
    if not CAUSAL:  # the last keys past a whole SUB_N step
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, k_sub, v_sub, stride_ks, stride_vs, pos, shared_end,
                                  hi, Sq, Sk, qk_scale, offs_d, HEAD_DIM, PAD, True, CAUSAL, SUB_N, USE_TMA)
    _fwd_store(acc, l_i, m_i, pos, head, act, valid, O, LSE, b64, stride_ob, stride_os, stride_oh,
               stride_lb, stride_lh, offs_d, HEAD_DIM, PAD)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Sq", "stride_lb", "stride_lh"])
def _chain_attention_bwd_preprocess_kernel(
    O, DO, DELTA, HEADS, CHAINS, SC, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
    Sq, Hkv,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, ALIGN: tl.constexpr, G: tl.constexpr,
    G_P2: tl.constexpr, HAS_SC: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O over the active packed rows (inactive rows are never read)."""
    PAD: tl.constexpr = HEAD_DIM != HEAD_DIM_P2
    stride_ob, stride_os, stride_oh = hint_strides(stride_ob, stride_os, stride_oh, ALIGN)
    stride_dob, stride_dos, stride_doh = hint_strides(stride_dob, stride_dos, stride_doh, ALIGN)
    b, g, start, q_off, Sq, _, _ = program_block(CU_Q, CU_Q, Sq, Sq, Hkv, BLOCK_M, False, VARLEN)
    if VARLEN:
        if start >= G * Sq:
            return
        O += q_off * stride_os
        DO += q_off * stride_dos
        DELTA += q_off
    A = _active_members(SC, CHAINS, b, g, G, G_P2, HAS_SC)
    pos, mem, act, valid = packed_rows(start, Sq, A * Sq, A, G, BLOCK_M, HAS_SC)
    head = tl.load(HEADS + g * G + mem)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    o = load_tile(row_ptrs(O, b64, pos, head, stride_ob, stride_os, stride_oh, offs_d), act, offs_d,
                  HEAD_DIM, PAD, True)
    do = load_tile(row_ptrs(DO, b64, pos, head, stride_dob, stride_dos, stride_doh, offs_d), act, offs_d,
                   HEAD_DIM, PAD, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b64 * stride_lb + head.to(tl.int64) * stride_lh + pos, delta, mask=act)


@triton.jit
def _bwd_rows(dk, dv, k, v, cols, Q, DO, LSE, DELTA, DQ, HEADS, b64, g, A, n_act,
              stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
              stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
              row_lo, row_hi, Sq, Sk, qk_scale, softmax_scale, offs_d,
              G: tl.constexpr, HAS_SC: tl.constexpr, HEAD_DIM: tl.constexpr, PAD: tl.constexpr,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Packed rows [row_lo, row_hi) against the keys ``cols`` (tiles k, v): accumulate dK, dV and,
    with DQ_ATOMIC, add each step's dQ tile into the fp32 buffer DQ. Keys past Sk are
    always masked. ``MASK``: the causal mask applies too (rows of a step past row_hi are dropped);
    without it every row sees every key below Sk."""
    for m0 in range(row_lo, row_hi, BLOCK_M):
        pos, mem, act, valid = packed_rows(m0, Sq, n_act, A, G, BLOCK_M, HAS_SC)
        if MASK:
            act = act & (m0 + tl.arange(0, BLOCK_M) < row_hi)
        head = tl.load(HEADS + g * G + mem)
        q, do, lse, delta = load_grad_rows(Q, DO, LSE, DELTA, b64, pos, head, act, stride_qb, stride_qs, stride_qh,
                                           stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, offs_d,
                                           HEAD_DIM, PAD)
        s_t = mma(k, tl.trans(q), tl.zeros((k.shape[0], BLOCK_M), dtype=tl.float32)) * qk_scale
        # Keys past Sk are zero tiles, yet their probability exp2(0 - lse) overflows where every
        # real score is very negative (lse << 0), and inf * 0 = NaN in dQ: always masked.
        vis = (cols < Sk)[:, None]
        if MASK and CAUSAL:
            vis = vis & (cols[:, None] <= pos[None, :] + (Sk - Sq))
        s_t = tl.where(vis, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = mma(p_t.to(do.dtype), do, dv)
        dp_t = mma(v, tl.trans(do), tl.zeros((k.shape[0], BLOCK_M), dtype=tl.float32))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = mma(ds_t, q, dk)
        if DQ_ATOMIC:
            if offs_d.shape[0] >= WGMMA_M:  # dQ^T = K^T dS^T: M is the head dim, a warpgroup tile
                dq_t = mma(tl.trans(k), ds_t, tl.zeros((k.shape[1], BLOCK_M), dtype=tl.float32)) * softmax_scale
                tl.atomic_add(row_ptrs_t(DQ, b64, pos, head, stride_dqb, stride_dqs, stride_dqh, offs_d), dq_t,
                              mask=tile_mask_t(act, offs_d, HEAD_DIM, PAD), sem="relaxed")
            else:
                dq = mma(tl.trans(ds_t), k, tl.zeros((BLOCK_M, k.shape[1]), dtype=tl.float32)) * softmax_scale
                tl.atomic_add(row_ptrs(DQ, b64, pos, head, stride_dqb, stride_dqs, stride_dqh, offs_d), dq,
                              mask=tile_mask(act, offs_d, HEAD_DIM, PAD), sem="relaxed")
    return dk, dv


@triton.jit
def _store_dkdv(dk, dv, DK, DV, b64, g64, cols, Sk, stride_dkb, stride_dks, stride_dkh, softmax_scale,
                offs_d, HEAD_DIM: tl.constexpr, PAD: tl.constexpr):
    off = b64 * stride_dkb + g64 * stride_dkh + cols.to(tl.int64)[:, None] * stride_dks + offs_d[None, :]
    mask = tile_mask(cols < Sk, offs_d, HEAD_DIM, PAD)
    tl.store(DK + off, (dk * softmax_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_diagonal(k_base, v_base, c0, Q, DO, LSE, DELTA, DQ, HEADS, b64, g, A, n_act,
                  stride_ks, stride_vs, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
                  stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, mid, Sq, Sk, qk_scale,
                  softmax_scale, offs_d,
                  G: tl.constexpr, HAS_SC: tl.constexpr, HEAD_DIM: tl.constexpr, PAD: tl.constexpr,
                  DQ_ATOMIC: tl.constexpr, N_SUB: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr):
    """(dK, dV) of keys [c0, c0 + N_SUB * SUB_N) over the rows before ``mid`` (the causal
    diagonal), one SUB_N-key sub-block at a time from the first row that sees its first key;
    halves are built recursively and stacked, so no tile is held twice."""
    if N_SUB == 1:
        cols = c0 + tl.arange(0, SUB_N)
        ok = cols < Sk
        k = load_tile(k_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], ok, offs_d,
                      HEAD_DIM, PAD, True)
        v = load_tile(v_base + cols.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], ok, offs_d,
                      HEAD_DIM, PAD, True)
        row_lo = tl.minimum(tl.maximum(c0 - (Sk - Sq), 0), Sq) * A
        dk = tl.zeros((SUB_N, offs_d.shape[0]), dtype=tl.float32)
        dv = tl.zeros((SUB_N, offs_d.shape[0]), dtype=tl.float32)
        dk, dv = _bwd_rows(dk, dv, k, v, cols, Q, DO, LSE, DELTA, DQ, HEADS, b64, g, A, n_act,
                           stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
                           stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, row_lo,
                           tl.maximum(mid, row_lo), Sq, Sk, qk_scale, softmax_scale, offs_d, G, HAS_SC,
                           HEAD_DIM, PAD, True, True, DQ_ATOMIC, SUB_M)
    else:
        dk_a, dv_a = _bwd_diagonal(k_base, v_base, c0, Q, DO, LSE, DELTA, DQ, HEADS, b64, g, A, n_act,
                                   stride_ks, stride_vs, stride_qb, stride_qs, stride_qh, stride_dob,
                                   stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb,
                                   stride_lh, mid, Sq, Sk, qk_scale, softmax_scale, offs_d, G, HAS_SC,
                                   HEAD_DIM, PAD, DQ_ATOMIC, N_SUB // 2, SUB_M, SUB_N)
        dk_b, dv_b = _bwd_diagonal(k_base, v_base, c0 + (N_SUB // 2) * SUB_N, Q, DO, LSE, DELTA, DQ, HEADS,
                                   b64, g, A, n_act, stride_ks, stride_vs, stride_qb, stride_qs, stride_qh,
                                   stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
                                   stride_lb, stride_lh, mid, Sq, Sk, qk_scale, softmax_scale, offs_d, G,
                                   HAS_SC, HEAD_DIM, PAD, DQ_ATOMIC, N_SUB // 2, SUB_M, SUB_N)
        dk = stack_rows(dk_a, dk_b)
        dv = stack_rows(dv_a, dv_b)
    return dk, dv


@autotune(configs=bwd_configs(), key=AUTOTUNE_KEY + ["DQ_ATOMIC"], prune=prune_bwd, reset_to_zero=["DQ"])
@triton.jit(do_not_specialize=["Sq", "Sk", "stride_lb", "stride_lh"])
def _chain_attention_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, HEADS, CHAINS, SC, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh,
    stride_lb, stride_lh,
    Sq, Sk, Hkv, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, ALIGN: tl.constexpr, G: tl.constexpr,
    G_P2: tl.constexpr, CAUSAL: tl.constexpr, HAS_SC: tl.constexpr, VARLEN: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAG: tl.constexpr, SUB_M: tl.constexpr,
    SUB_N: tl.constexpr,
):
    """dK, dV of one (b, kv head, key block), summed over the active rows of all G query heads
    (and, with DQ_ATOMIC, their dQ). A sequence with no query (varlen) still writes its keys' zeros."""
    PAD: tl.constexpr = HEAD_DIM != HEAD_DIM_P2
    stride_qb, stride_qs, stride_qh = hint_strides(stride_qb, stride_qs, stride_qh, ALIGN)
    stride_kb, stride_ks, stride_kh = hint_strides(stride_kb, stride_ks, stride_kh, ALIGN)
    stride_vb, stride_vs, stride_vh = hint_strides(stride_vb, stride_vs, stride_vh, ALIGN)
    stride_dob, stride_dos, stride_doh = hint_strides(stride_dob, stride_dos, stride_doh, ALIGN)
    stride_dqb, stride_dqs, stride_dqh = hint_strides(stride_dqb, stride_dqs, stride_dqh, ALIGN)
    stride_dkb, stride_dks, stride_dkh = hint_strides(stride_dkb, stride_dks, stride_dkh, ALIGN)
    b, g, n0, q_off, Sq, k_off, Sk = program_block(CU_Q, CU_K, Sq, Sk, Hkv, BLOCK_N, False, VARLEN)
    if VARLEN:
        if n0 >= Sk:  # past this sequence's keys
            return
        Q += q_off * stride_qs
        DO += q_off * stride_dos
        if DQ_ATOMIC:  # DQ is a one-element stand-in without it
            DQ += q_off * stride_dqs
        LSE += q_off
        DELTA += q_off
        K += k_off * stride_ks
        V += k_off * stride_vs
        DK += k_off * stride_dks
        DV += k_off * stride_dks
    b64 = b.to(tl.int64)
    g64 = g.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    k_base = K + b64 * stride_kb + g64 * stride_kh
    v_base = V + b64 * stride_vb + g64 * stride_vh
    A = _active_members(SC, CHAINS, b, g, G, G_P2, HAS_SC)
    n_act = A * Sq
    shift = Sk - Sq
    if CAUSAL:
        # Rows from the first that sees every key of the block on run mask-free, in whole BLOCK_M
        # steps that end at n_act (``mid`` rounded up onto that grid); the rows before run masked.
        last_key = tl.minimum(n0 + BLOCK_N, Sk) - 1
        mid = tl.minimum(tl.maximum(last_key - shift, 0), Sq) * A
        mid = n_act - ((n_act - mid) // BLOCK_M) * BLOCK_M
        dk, dv = _bwd_diagonal(k_base, v_base, n0, Q, DO, LSE, DELTA, DQ, HEADS, b64, g, A, n_act,
                               stride_ks, stride_vs, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos,
                               stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, mid, Sq,
                               Sk, qk_scale, softmax_scale, offs_d, G, HAS_SC, HEAD_DIM, PAD, DQ_ATOMIC,
                               BLOCK_N // SUB_N, SUB_M, SUB_N)
    else:
        mid = n_act * 0
        dk = tl.zeros((BLOCK_N, HEAD_DIM_P2), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, HEAD_DIM_P2), dtype=tl.float32)
    cols = n0 + tl.arange(0, BLOCK_N)
    k = load_tile(k_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], cols < Sk, offs_d,
                  HEAD_DIM, PAD, True)
    v = load_tile(v_base + cols.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], cols < Sk, offs_d,
                  HEAD_DIM, PAD, True)
    dk, dv = _bwd_rows(dk, dv, k, v, cols, Q, DO, LSE, DELTA, DQ, HEADS, b64, g, A, n_act,
                       stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
                       stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, mid, n_act, Sq, Sk,
                       qk_scale, softmax_scale, offs_d, G, HAS_SC, HEAD_DIM, PAD, False, CAUSAL, DQ_ATOMIC,
                       BLOCK_M)
    _store_dkdv(dk, dv, DK, DV, b64, g64, cols, Sk, stride_dkb, stride_dks, stride_dkh, softmax_scale,
                offs_d, HEAD_DIM, PAD)


@triton.jit
def _dq_keys(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, pos, start_n, end_n,
             Sq, Sk, qk_scale, offs_d,
             HEAD_DIM: tl.constexpr, PAD: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
             BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start_n, end_n, BLOCK_N):
        cols = n0 + offs_n
        ok = cols < Sk
        k = load_keys(k_src, n0, cols, ok, stride_ks, offs_d, HEAD_DIM, PAD, MASK, USE_TMA)
        v = load_keys(v_src, n0, cols, ok, stride_vs, offs_d, HEAD_DIM, PAD, MASK, USE_TMA)
        s = mma(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32)) * qk_scale
        if MASK:
            vis = ok[None, :]
            if CAUSAL:
                vis = vis & (cols[None, :] <= pos[:, None] + (Sk - Sq))
            s = tl.where(vis, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = mma(do, tl.trans(v), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32))
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq)
    return dq


@autotune(configs=dq_configs(), key=AUTOTUNE_KEY + ["TMA_KV"], prune=prune_dq)
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
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, ALIGN: tl.constexpr, G: tl.constexpr,
    G_P2: tl.constexpr, CAUSAL: tl.constexpr, HAS_SC: tl.constexpr, VARLEN: tl.constexpr,
    TMA_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAG: tl.constexpr, SUB_M: tl.constexpr,
    SUB_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    PAD: tl.constexpr = HEAD_DIM != HEAD_DIM_P2
    tl.static_assert(TMA_KV or not USE_TMA, "TMA needs K / V bases and strides that are 16-byte multiples")
    stride_qb, stride_qs, stride_qh = hint_strides(stride_qb, stride_qs, stride_qh, ALIGN)
    stride_kb, stride_ks, stride_kh = hint_strides(stride_kb, stride_ks, stride_kh, ALIGN)
    stride_vb, stride_vs, stride_vh = hint_strides(stride_vb, stride_vs, stride_vh, ALIGN)
    stride_dob, stride_dos, stride_doh = hint_strides(stride_dob, stride_dos, stride_doh, ALIGN)
    stride_dqb, stride_dqs, stride_dqh = hint_strides(stride_dqb, stride_dqs, stride_dqh, ALIGN)
    b, g, start, q_off, Sq, k_off, Sk = program_block(CU_Q, CU_K, Sq, Sk, Hkv, BLOCK_M, True, VARLEN)
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
    pos, mem, act, valid = packed_rows(start, Sq, n_act, A, G, BLOCK_M, HAS_SC)
    head = tl.load(HEADS + g * G + mem)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    q, do, lse, delta = load_grad_rows(Q, DO, LSE, DELTA, b64, pos, head, act, stride_qb, stride_qs, stride_qh,
                                       stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, offs_d,
                                       HEAD_DIM, PAD)
    k_src, v_src = kv_sources(K, V, b64, g, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, Sk,
                              HEAD_DIM, HEAD_DIM_P2, BLOCK_N, USE_TMA)
    lo, hi = visible_keys(start, n_act, A, Sq, Sk, CAUSAL, BLOCK_M)
    full = (lo // BLOCK_N) * BLOCK_N

    dq = tl.zeros((BLOCK_M, HEAD_DIM_P2), dtype=tl.float32)
    dq = _dq_keys(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, pos, 0, full,
                  Sq, Sk, qk_scale, offs_d, HEAD_DIM, PAD, False, CAUSAL, BLOCK_N, USE_TMA)
    dq = _dq_keys(dq, q, do, lse, delta, k_src, v_src, stride_ks, stride_vs, pos, full, hi,
                  Sq, Sk, qk_scale, offs_d, HEAD_DIM, PAD, True, CAUSAL, BLOCK_N, USE_TMA)
    dq = tl.where(act[:, None], dq * softmax_scale, 0.0)
    tl.store(row_ptrs(DQ, b64, pos, head, stride_dqb, stride_dqs, stride_dqh, offs_d),
             dq.to(DQ.dtype.element_ty), mask=tile_mask(valid, offs_d, HEAD_DIM, PAD))
