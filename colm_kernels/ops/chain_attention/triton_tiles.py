"""Tiles of the training attention kernels (``triton_kernels``): row packing, key ranges, head-dim
padded loads, autotune configurations and their pruner.

Head dims. Every multiple of 8 in ``[8, 256]`` runs: tiles span ``HEAD_DIM_P2`` columns (the next
power of two, at least 16 for ``tl.dot``) and loads / stores mask the columns past ``HEAD_DIM``
(``PAD``). Padded q / k / v / dO columns load as zeros, so every product over the head dim is exact
and padded output columns are never stored.

Causal diagonal. A tile that straddles the causal diagonal computes masked scores it throws away.
The kernels therefore run the mask-free bulk of a program's work on big tiles and finish the
diagonal on small ones (``SUB_M`` rows x ``SUB_N`` keys, from the config's ``DIAG`` granularity):
the forward splits its rows into sub-blocks (``tl.gather`` of the accumulators), the backward
splits its key block. At H100 tiles this keeps the executed MMA FLOPs of a causal 512-token
attention within 3 % (forward) and 7 % (backward) of the visible (query, key) pairs, where whole
128-wide tiles would execute 25 % more; ``tests/ops/test_attention_work.py`` holds the bounds.
"""
from __future__ import annotations

from typing import Callable, List

import triton
import triton.language as tl

from colm_kernels._triton.utils import SMEM_BUDGET, small_tiles

__all__ = ["MIN_HEAD_DIM", "MAX_HEAD_DIM", "HEAD_DIM_STEP", "head_dim_p2", "head_dim_reasons",
           "fwd_configs", "bwd_configs", "dq_configs", "prune_fwd", "prune_bwd", "prune_dq", "AUTOTUNE_KEY"]

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
# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M packed query rows, BLOCK_N keys. ``DIAG``: the
# causal diagonal's granularity (keys per step; query positions per forward sub-block).
_FWD_GPU = ((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
            (64, 32, 4, 2))
_FWD_DIAG = 16  # forward: 16 positions x 16 keys; 32 positions would leave 6 % of waste at 512 tokens
# The fused backward (dK/dV reduced in-kernel, dQ by fp32 atomics): BLOCK_M rows per step of the
# row loop over one BLOCK_N key block.
_BWD_GPU = ((64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (32, 128, 8, 3),
            (32, 64, 4, 3))
_BWD_DIAG = 32
_DQ_GPU = ((128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3))
# Interpreter: small tiles keep masking paths exercised and the interpreter fast; the forward's
# 32 rows and the backward's 32 keys still split into diagonal sub-blocks.
_FWD_INTERPRETER, _BWD_INTERPRETER, _DQ_INTERPRETER = (32, 16, 1, 1), (16, 32, 1, 1), (16, 16, 1, 1)
_INTERPRETER_DIAG = 8


def _configs(gpu, interpreter, diag: int) -> List[triton.Config]:
    if small_tiles():
        gpu, diag = (interpreter,), _INTERPRETER_DIAG
    # SUB_M / SUB_N are placeholders the pruner sets from G and the block sizes.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "DIAG": diag, "SUB_M": bm, "SUB_N": bn},
                          num_warps=w, num_stages=s) for bm, bn, w, s in gpu]


def fwd_configs() -> List[triton.Config]:
    return _configs(_FWD_GPU, _FWD_INTERPRETER, _FWD_DIAG)


def bwd_configs() -> List[triton.Config]:
    return _configs(_BWD_GPU, _BWD_INTERPRETER, _BWD_DIAG)


def dq_configs() -> List[triton.Config]:
    return _configs(_DQ_GPU, _DQ_INTERPRETER, 16)


AUTOTUNE_KEY = ["HEAD_DIM", "G", "CAUSAL", "HAS_SC", "VARLEN"]


def _sub_blocks(kind: str, bm: int, bn: int, diag: int, g: int):
    """(SUB_M, SUB_N) of the causal diagonal: ``diag`` keys per step (at least 16, ``tl.dot``'s
    K) and ``diag`` query positions (``diag * G`` packed rows) per row step, so that the forward's
    sub-blocks span ``diag`` positions and the backward's row steps start where its key
    sub-blocks' diagonals do. The dQ kernel has no diagonal split."""
    if kind == "dq":
        return bm, bn
    return min(bm, max(16, diag * triton.next_power_of_2(g))), min(bn, max(16, diag))


def _make_pruner(kind: str, budget: Callable) -> Callable:
    """Keep the configs whose shared memory fits the H100 and whose estimated registers a thread
    (``budget(cfg, head_dim_p2, element_size)``) stay at most 255 (no spills; the estimates are
    calibrated against ptxas for sm_90a); the smallest survives if none fits. Fills SUB_M /
    SUB_N. Depends only on autotune keys (head dim, G) and the dtype."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dp, es, g = int(args["HEAD_DIM_P2"]), args["Q"].element_size(), int(args["G"])
        sized = []
        for cfg in configs:
            kw = dict(cfg.kwargs)
            kw["SUB_M"], kw["SUB_N"] = _sub_blocks(kind, kw["BLOCK_M"], kw["BLOCK_N"], kw["DIAG"], g)
            stages = max(1, cfg.num_stages)
            # resident q/k/v tiles + streamed tiles per pipeline stage, input dtype
            tiles = {"fwd": kw["BLOCK_M"] + 2 * kw["BLOCK_N"] * stages,
                     "bwd": 2 * kw["BLOCK_N"] + 2 * kw["BLOCK_M"] * stages,
                     "dq": 2 * kw["BLOCK_M"] + 2 * kw["BLOCK_N"] * stages}[kind]
            smem = tiles * dp * es
            regs = budget(kw, cfg.num_warps, dp, es)
            sized.append((smem, regs, triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
        fitting = [c for s, r, c in sized if s <= SMEM_BUDGET and r <= 255]
        return fitting or [min(sized, key=lambda t: (t[1], t[0]))[2]]

    return prune


def _fwd_regs(kw, warps, dp, es):
    """fp32 accumulator + q tile + fp32 scores/probabilities of one step, 32-bit registers a thread."""
    threads = 32 * warps
    return (kw["BLOCK_M"] * dp * (4 + es) + 2 * kw["BLOCK_M"] * kw["BLOCK_N"] * 4) // (4 * threads) + 40


def _bwd_regs(kw, warps, dp, es):
    """fp32 dK, dV + k, v tiles + one step's fp32 scores / dP / dS (and the fp32 dQ tile)."""
    threads = 32 * warps
    return (2 * kw["BLOCK_N"] * dp * (4 + es) + 3 * kw["BLOCK_M"] * kw["BLOCK_N"] * 4
            + kw["BLOCK_M"] * dp * 4) // (4 * threads) + 40


def _dq_regs(kw, warps, dp, es):
    threads = 32 * warps
    return (kw["BLOCK_M"] * dp * (4 + 2 * es) + 3 * kw["BLOCK_M"] * kw["BLOCK_N"] * 4) // (4 * threads) + 40


prune_fwd = _make_pruner("fwd", _fwd_regs)
prune_bwd = _make_pruner("bwd", _bwd_regs)
prune_dq = _make_pruner("dq", _dq_regs)


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
def tile_mask(ok, offs_d, HEAD_DIM: tl.constexpr, PAD: tl.constexpr):
    """Mask of a (rows, HEAD_DIM_P2) tile: the row is ``ok`` and, when padded, the column < HEAD_DIM."""
    if PAD:
        m = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    else:
        m = ok[:, None]
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
