"""Tiles of the training attention kernels (``triton_kernels``): row packing, key ranges, head-dim
padded loads, autotune configurations and their pruner.

Head dims. Every multiple of 8 in ``[8, 256]`` runs: tiles span ``HEAD_DIM_P2`` columns (the next
power of two, at least 16 for ``tl.dot``) and loads / stores mask the columns past ``HEAD_DIM``
(``PAD``). Padded q / k / v / dO columns load as zeros, so every product over the head dim is exact
and padded output columns are never stored.

Causal diagonal. A tile that straddles the causal diagonal computes masked scores it throws away.
The kernels therefore run the mask-free bulk of a program's work on big tiles and the diagonal on
smaller ones (``SUB_M`` rows x ``SUB_N`` keys, from the config's ``DIAG`` granularity): the forward
splits its rows into sub-blocks, the backward its key block, each sub-block running only up to its
own part of the diagonal. The sub-blocks are computed first, recursively by halves, and stacked
(``stack_rows``) into the big tile's accumulators, so no accumulator is held twice.

Every product's M is a warpgroup tile (``WGMMA_M`` = 64 rows, wgmma's M per warpgroup) at the H100
tiles for head dims 64 to 256 wide: below 64, Triton lowers a ``tl.dot`` to Ampere's ``mma.sync``,
which runs at half Hopper's tensor-core rate or less. So the forward's diagonal sub-blocks are at
least 64 packed rows (keys still step by 16), the backward's at least 64 keys, and the atomic dQ
of the backward's 32-row steps is computed transposed (``dQ^T = K^T dS^T``: M is the head dim).
Smaller diagonal tiles would execute fewer FLOPs, but on mma.sync. At the roofline (each MMA
kind's FLOPs at its rate, mma.sync at half wgmma's), a causal 512-token attention at the H100
tiles, all on wgmma, costs 1.03x-1.12x (forward, G = 4 to 1) and 1.12x (backward, against
FlashAttention-2's ideal) its useful FLOPs at the wgmma rate; the 16-row / 32-key mma.sync
diagonal before executed 1.03x and 1.06x, but cost 1.03x-1.31x and 1.52x at those rates.
``tests/ops/test_attention_work.py`` holds the bounds.
"""
from __future__ import annotations

from typing import Callable, List

import triton
import triton.language as tl

from colm_kernels._triton.device import small_tiles
from colm_kernels._triton.gemm_configs import SMEM_BUDGET
from colm_kernels._triton.tma import tile_desc, tma_choices, tma_device

__all__ = ["MIN_HEAD_DIM", "MAX_HEAD_DIM", "HEAD_DIM_STEP", "head_dim_p2", "head_dim_reasons",
           "fwd_configs", "bwd_configs", "dq_configs", "prune_fwd", "prune_bwd", "prune_dq", "AUTOTUNE_KEY",
           "seq_bounds", "program_block", "packed_rows", "row_ptrs", "row_ptrs_t", "WGMMA_M",
           "tile_mask", "tile_mask_t", "load_tile", "visible_keys", "stack_rows",
           "hint_strides", "stride_alignment", "tma_kv_legal", "key_source", "kv_sources", "load_keys",
           "load_grad_rows"]

# Head dims of the training kernels: multiples of 8 in [8, 256] (flash-attn's rule), padded inside
# the kernels to a power of two. (``heads.MIN_HEAD_DIM`` / ``MAX_HEAD_DIM`` are the decode
# kernels' rule and are left to them.)
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_STEP = 8, 256, 8


def head_dim_p2(d: int) -> int:
    """Columns of a tile for head dim ``d``: the next power of two, at least 16 (``tl.dot``'s K)."""
    return max(16, triton.next_power_of_2(int(d)))


def head_dim_reasons(d) -> List[str]:
    """Why the training kernels cannot take head dim ``d`` (empty: they can)."""
    if isinstance(d, bool) or not isinstance(d, int) or not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM) \
            or d % HEAD_DIM_STEP:
        return [f"head dim must be a multiple of {HEAD_DIM_STEP} in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}"]
    return []


# ----------------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------------
# Per head-dim class (the smallest key >= HEAD_DIM_P2 for 16-bit inputs; each list first choice
# first): (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_M packed query rows, BLOCK_N keys. Each
# list is what compiled for sm_90a without register spills (ptxas -v on every kept config, fp16
# and bf16, head dims 8 to 256 padded or not, G = 1 to 4, causal or not, varlen and seq_chains or
# not, atomic dQ or not), leaving out configs that reached 250+ registers in some of those.
_FWD = {
    64: ((128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)),
    128: ((128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2)),  # 128 x 128 spills 48 B with varlen
    256: ((64, 32, 8, 2),),  # 64 x 64 reaches 254 registers
}
# The key-block backward: BLOCK_N keys per program (the M of its S^T, dP^T, dK and dV products:
# wgmma from 64), BLOCK_M rows per step of its row loop (their N; the atomic dQ is computed
# transposed so that its M is the head dim). 64 rows spill (12 B at 64 x 128 with varlen and
# seq_chains). Head dim 256 runs mma.sync only: its fp32 dK and dV fit 32 keys (or 16), below
# wgmma's M = 64.
_BWD = {
    32: ((32, 64, 4, 3),),
    64: ((32, 128, 8, 3), (32, 64, 4, 3)),
    128: ((32, 64, 8, 3), (32, 64, 8, 2)),
    256: ((16, 32, 8, 2), (32, 16, 8, 2)),
}
# Triton before 3.9 allocates more registers to the head-dim-128 backward (80 to 128 wide): at 32
# rows it spills up to 712 B (3 stages) or 416 B (1 stage), at 16 rows 160 B (2 stages), with head
# dim 80, varlen, causal, seq_chains and atomic dQ; 16 rows unpipelined do not (and spill 16 B
# under 3.9). Both ends of setup.py's range are compiled in CI (README, second tier).
_BWD_BEFORE_TRITON_3_9 = {128: ((16, 64, 8, 1),)}
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
    _BWD = {**_BWD, **_BWD_BEFORE_TRITON_3_9}
_DQ = {
    64: ((128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)),
    128: ((128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)),
    # 128 x 32 spills 24 B with varlen; 32 x 64 (mma.sync, M = 32) is kept as the autotuner's
    # alternative at 150 registers, where 64 x 16 (wgmma) takes 234
    256: ((64, 16, 8, 2), (32, 64, 8, 2)),
}
# TMA twins (``USE_TMA``, listed after the pointer configs so ``COLM_KERNELS_AUTOTUNE=0`` runs a
# pointer config): the kernels that stream K / V tiles (the forward and the dQ pass) also run
# every shape above with those tiles fetched by TMA (``key_source`` / ``load_keys``), for 16-bit
# inputs whose K / V can back descriptors (``TMA_KV``). The key-block backward has none: it loads
# its K / V tile once per program and streams the packed query rows, a gather across heads through
# the HEADS table that TMA boxes cannot express in general.
_TMA_TABLES = {"fwd": _FWD, "dq": _DQ}
# The causal diagonal's granularity (``_sub_blocks``): 16 query positions x 16 keys forward (rows
# then rounded up to a warpgroup tile, ``WGMMA_M``), 64 keys backward (the M of its products).
_DIAG = {"fwd": 16, "bwd": 64, "dq": 16}
WGMMA_M = tl.constexpr(64)  # rows of one warpgroup's wgmma: a tl.dot with fewer runs on mma.sync
# Interpreter: one small config; the forward's 32 rows and the backward's 32 keys still split into
# diagonal sub-blocks, so those paths run in the CPU tests.
_INTERPRETER = {"fwd": (32, 16, 1, 1), "bwd": (16, 32, 1, 1), "dq": (16, 16, 1, 1)}
_INTERPRETER_DIAG = 8
_TABLES = {"fwd": _FWD, "bwd": _BWD, "dq": _DQ}


def _table(kind: str, head_dim_p2_: int, element_size: int, tma: bool = False):
    """The config list of a head-dim class (``tma``: its TMA twins); fp32 inputs take the class of
    twice the head dim."""
    tables = (_TMA_TABLES if tma else _TABLES).get(kind)
    if not tables:
        return ()
    if small_tiles():
        return (_INTERPRETER[kind],)
    width = head_dim_p2_ * max(1, element_size // 2)
    return tables[min((c for c in tables if c >= width), default=max(tables))]


def _configs(kind: str) -> List[triton.Config]:
    """Every config any head-dim class uses (SUB_M / SUB_N placeholders the pruner sets): the
    pointer configs, then the TMA twins (``USE_TMA``; a kernel without twins gets no such key)."""
    diag = _INTERPRETER_DIAG if small_tiles() else _DIAG[kind]
    out = []
    for tma in ((False, True) if kind in _TMA_TABLES else (None,)):
        tables = (_TMA_TABLES if tma else _TABLES)[kind]
        rows = [_INTERPRETER[kind]] if small_tiles() else dict.fromkeys(c for t in tables.values() for c in t)
        extra = {} if tma is None else {"USE_TMA": tma}
        out += [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "DIAG": diag, "SUB_M": bm, "SUB_N": bn, **extra},
                              num_warps=w, num_stages=s) for bm, bn, w, s in rows]
    return out


def fwd_configs() -> List[triton.Config]:
    return _configs("fwd")


def bwd_configs() -> List[triton.Config]:
    return _configs("bwd")


def dq_configs() -> List[triton.Config]:
    return _configs("dq")


AUTOTUNE_KEY = ["HEAD_DIM", "G", "CAUSAL", "HAS_SC", "VARLEN"]


def _sub_blocks(kind: str, bm: int, bn: int, diag: int, g: int):
    """(SUB_M, SUB_N) of the causal diagonal: ``diag`` keys per step (at least 16, ``tl.dot``'s
    K) and ``diag`` query positions (``diag * G`` packed rows) per row step, so that the forward's
    sub-blocks span ``diag`` positions and the backward's row steps start where its key
    sub-blocks' diagonals do; at the H100 tiles the forward's row sub-blocks are at least a
    warpgroup tile (``WGMMA_M``: their products' M). The dQ kernel has no diagonal split."""
    if kind == "dq":
        return bm, bn
    rows = max(16 if small_tiles() else WGMMA_M.value, diag * triton.next_power_of_2(g))
    return min(bm, rows), min(bn, max(16, diag))


def tma_kv_legal(args, element_size: int) -> bool:
    """Whether a launch with kernel arguments ``args`` may run TMA configs: 16-bit inputs (fp32
    dots are IEEE FMA loops, not wgmma), K / V whose bases and strides are 16-byte multiples
    (``TMA_KV``, from ``strides_tma_aligned``) and, on CUDA, a GPU with TMA."""
    return element_size == 2 and bool(args.get("TMA_KV", False)) and tma_device(args["K"].device)


def _make_pruner(kind: str) -> Callable:
    """Keep the configs of the head-dim class (``_table``), in its order, whose shared memory fits
    the H100 (the class's last one if none does: fp32 at the largest head dims), with SUB_M /
    SUB_N set: the pointer configs, then (``tma_choices``: where ``tma_kv_legal``, under the
    current ``tma_mode``) their TMA twins. Depends only on autotune keys (head dim, G, TMA_KV) and
    the dtype."""

    def filled(cfg, g):
        kw = dict(cfg.kwargs)
        kw["SUB_M"], kw["SUB_N"] = _sub_blocks(kind, kw["BLOCK_M"], kw["BLOCK_N"], kw["DIAG"], g)
        return triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def smem(cfg, dp, es):
        bm, bn, stages = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], max(1, cfg.num_stages)
        # resident q / k, v tiles + the tiles streamed per pipeline stage, in the input dtype
        tiles = {"fwd": bm + 2 * bn * stages, "bwd": 2 * bn + 2 * bm * stages, "dq": 2 * bm + 2 * bn * stages}
        return tiles[kind] * dp * es

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dp, es, g = int(args["HEAD_DIM_P2"]), args["Q"].element_size(), int(args["G"])
        by_shape = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                     bool(c.kwargs.get("USE_TMA", False))): c for c in configs}
        offered = tma_choices(kind in _TMA_TABLES and tma_kv_legal(args, es))
        if not any(_table(kind, dp, es, tma) for tma in offered):  # a class without twins
            offered = (False,)
        kept = []
        for tma in offered:
            table = [by_shape[shape + (tma,)] for shape in _table(kind, dp, es, tma) if shape + (tma,) in by_shape]
            kept += [cfg for cfg in table if smem(cfg, dp, es) <= SMEM_BUDGET] or table[-1:]
        return [filled(cfg, g) for cfg in kept]

    return prune


prune_fwd = _make_pruner("fwd")
prune_bwd = _make_pruner("bwd")
prune_dq = _make_pruner("dq")


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def seq_bounds(CU_Q, CU_K, b, Sq, Sk, VARLEN: tl.constexpr):
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
def program_block(CU_Q, CU_K, Sq, Sk, Hkv, BLOCK: tl.constexpr, LATE_FIRST: tl.constexpr, VARLEN: tl.constexpr):
    """The prologue every attention kernel shares: this program's sequence ``b`` and kv head ``g``
    (grid axis 1 is ``b * Hkv + g``), the first row or key of its block along axis 0
    (``LATE_FIRST``: the last block first, so long causal rows start early), and its sequence's
    ``seq_bounds``: ``(b, g, start, q_off, Sq, k_off, Sk)``."""
    pid_bg = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    if LATE_FIRST:
        start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    q_off, Sq, k_off, Sk = seq_bounds(CU_Q, CU_K, b, Sq, Sk, VARLEN)
    return b, g, start, q_off, Sq, k_off, Sk


@triton.jit
def packed_rows(start, Sq, n_act, A, G: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SC: tl.constexpr):
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
def row_ptrs(BASE, b64, pos, head, stride_b, stride_s, stride_h, offs_d):
    return (BASE + b64 * stride_b + pos.to(tl.int64)[:, None] * stride_s
            + head.to(tl.int64)[:, None] * stride_h + offs_d[None, :])


@triton.jit
def row_ptrs_t(BASE, b64, pos, head, stride_b, stride_s, stride_h, offs_d):
    """``row_ptrs`` transposed, (HEAD_DIM_P2, rows): built so, not by ``tl.trans`` of a pointer tile
    (which would move 64-bit pointers through shared memory)."""
    return (BASE + b64 * stride_b + pos.to(tl.int64)[None, :] * stride_s
            + head.to(tl.int64)[None, :] * stride_h + offs_d[:, None])


@triton.jit
def tile_mask(ok, offs_d, HEAD_DIM: tl.constexpr, PAD: tl.constexpr):
    """Mask of a (rows, HEAD_DIM_P2) tile: the row is ``ok`` and, when padded, the column < HEAD_DIM."""
    if PAD:
        m = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    else:
        m = ok[:, None]
    return m


@triton.jit
def tile_mask_t(ok, offs_d, HEAD_DIM: tl.constexpr, PAD: tl.constexpr):
    """``tile_mask`` of a ``row_ptrs_t`` tile (HEAD_DIM_P2, rows)."""
    if PAD:
        m = ok[None, :] & (offs_d < HEAD_DIM)[:, None]
    else:
        m = ok[None, :]
    return m


@triton.jit
def load_tile(ptrs, ok, offs_d, HEAD_DIM: tl.constexpr, PAD: tl.constexpr, ROW_MASK: tl.constexpr):
    """A (rows, HEAD_DIM_P2) tile, zeros outside: rows not ``ok`` (when ROW_MASK) and padded columns."""
    if ROW_MASK:
        x = tl.load(ptrs, mask=tile_mask(ok, offs_d, HEAD_DIM, PAD), other=0.0)
    elif PAD:
        x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def key_source(base, Sk, row_stride, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_N: tl.constexpr,
               USE_TMA: tl.constexpr):
    """What ``load_keys`` reads (BLOCK_N, HEAD_DIM_P2) tiles of one (sequence, kv head)'s keys or
    values from: their base pointer, or (USE_TMA) a TMA descriptor of the ``(Sk, HEAD_DIM)`` slice
    at ``base`` with row stride ``row_stride``, whose zero fill past Sk rows and HEAD_DIM columns
    stands in for the masks. (At least one row: a descriptor's extents are positive; a sequence
    without keys never loads one.)"""
    if USE_TMA:
        src = tile_desc(base, tl.maximum(Sk, 1), HEAD_DIM, row_stride, BLOCK_N, HEAD_DIM_P2)
    else:
        src = base
    return src


@triton.jit
def kv_sources(K, V, b64, g, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, Sk,
               HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """``key_source``s of sequence ``b64``'s keys and values at kv head ``g`` (BLOCK_N-row tiles)."""
    g64 = g.to(tl.int64)
    k_src = key_source(K + b64 * stride_kb + g64 * stride_kh, Sk, stride_ks, HEAD_DIM, HEAD_DIM_P2, BLOCK_N,
                       USE_TMA)
    v_src = key_source(V + b64 * stride_vb + g64 * stride_vh, Sk, stride_vs, HEAD_DIM, HEAD_DIM_P2, BLOCK_N,
                       USE_TMA)
    return k_src, v_src


@triton.jit
def load_grad_rows(Q, DO, LSE, DELTA, b64, pos, head, act, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos,
                   stride_doh, stride_lb, stride_lh, offs_d, HEAD_DIM: tl.constexpr, PAD: tl.constexpr):
    """What the backward needs of packed rows (positions ``pos`` of heads ``head``): ``(q, dO, lse,
    delta)``; rows not ``act`` read zeros and lse ``+inf`` (their probabilities are exactly 0)."""
    q = load_tile(row_ptrs(Q, b64, pos, head, stride_qb, stride_qs, stride_qh, offs_d), act, offs_d, HEAD_DIM, PAD,
                  True)
    do = load_tile(row_ptrs(DO, b64, pos, head, stride_dob, stride_dos, stride_doh, offs_d), act, offs_d, HEAD_DIM,
                   PAD, True)
    row = b64 * stride_lb + head.to(tl.int64) * stride_lh + pos
    lse = tl.load(LSE + row, mask=act, other=float("inf"))
    delta = tl.load(DELTA + row, mask=act, other=0.0)
    return q, do, lse, delta


@triton.jit
def load_keys(src, n0, cols, ok, row_stride, offs_d, HEAD_DIM: tl.constexpr, PAD: tl.constexpr,
              MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows ``cols = n0 + arange(BLOCK_N)`` of a ``key_source``: one TMA box at row n0, or a
    pointer load whose masks (rows ``ok`` when MASK, padded columns) read zeros where the box does.
    The same values either way, so both paths compute the same bits."""
    if USE_TMA:
        x = src.load([n0, 0])
    else:
        x = load_tile(src + cols.to(tl.int64)[:, None] * row_stride + offs_d[None, :], ok, offs_d, HEAD_DIM, PAD,
                      MASK)
    return x


@triton.jit
def visible_keys(start, n_act, A, Sq, Sk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(keys every active row of packed rows [start, start + BLOCK_M) sees, keys the last one sees):
    causal row at position i sees keys [0, i + Sk - Sq] within [0, Sk); (0, 0) without active rows."""
    any_act = start < n_act
    a = tl.maximum(A, 1)
    if CAUSAL:
        pos_lo = start // a
        pos_hi = (tl.minimum(start + BLOCK_M, n_act) - 1) // a
        lo = tl.minimum(tl.maximum(pos_lo + (Sk - Sq) + 1, 0), Sk)
        hi = tl.minimum(tl.maximum(pos_hi + (Sk - Sq) + 1, 0), Sk)
    else:
        lo = Sk
        hi = Sk
    lo = tl.where(any_act, lo, 0)
    hi = tl.where(any_act, hi, 0)
    return lo, hi


@triton.jit
def stack_rows(a, b):
    """``[a; b]``: two register tiles (1-D, or 2-D stacked along rows) of one shape, stacked."""
    if len(a.shape) == 1:
        c = tl.reshape(tl.permute(tl.join(a, b), (1, 0)), (2 * a.shape[0],))
    else:
        c = tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * a.shape[0], a.shape[1]))
    return c


@triton.jit
def hint_strides(stride_b, stride_s, stride_h, ALIGN: tl.constexpr):
    """A tensor's (batch, position, head) strides, passed in units of ALIGN elements
    (``stride_alignment``; the launchers divide) and scaled back here, so Triton knows them
    multiples of ALIGN: rows of a head dim that is not a multiple of 16 then still load and store
    as 16-byte vectors (Triton infers multiples of 16 only, and ``tl.multiple_of`` does not hold
    on kernel arguments)."""
    return stride_b * ALIGN, stride_s * ALIGN, stride_h * ALIGN


def stride_alignment(*tensors) -> int:
    """``ALIGN`` of the kernels: 1 when every stride but the last dim's is a multiple of 16 (Triton
    specialises those itself) or some is not a multiple of a 16-byte vector; else the elements of
    a 16-byte vector (8 for 16-bit dtypes), which every such stride is a multiple of."""
    strides = [st for t in tensors for st in t.stride()[:-1]]
    if all(st % 16 == 0 for st in strides):
        return 1
    vector = max(1, 16 // tensors[0].element_size())
    return vector if all(st % vector == 0 for st in strides) else 1
