"""Shared pieces of ``multi_chain_cross_entropy``'s Triton kernels (``triton_fwd``, ``triton_bwd``):
autotune configs and pruners, the one K loop over a logit tile's chains, tuple helpers for the
per-scale row state, tanh, and the launchers' checks and tables. The math and the tile plan are in
``triton_kernels``'s docstring."""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from colm_kernels._triton.device import check_tensor
from colm_kernels._triton.gemm_configs import gemm_configs, layout_key, make_gemm_pruner, register_gemm_layout
from colm_kernels._triton.tables import int64_table
from colm_kernels._triton.rows import rows_used
from colm_kernels._triton.tiles import load_int
from colm_kernels._triton.tma import operands_tma_aligned

REDUCTIONS = ("mean", "sum", "none")

# H100 configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). 16-bit inputs take the
# BLOCK_K = 64 rows (wgmma), fp32 inputs (IEEE FMA dots) the BLOCK_K <= 32 rows; every row kept
# for its dtype compiles without register spills on sm_90a at the default bench shape (V 32000,
# D 2048, 4 chains), with and without every option (ptxas -v; the pruners below say where not).
# Logit kernels (forward and dlogits): a GEMM tile plus an epilogue per scale. The (128, 64) and
# (64, 128) tiles take 8 warps: with 4 (64 accumulator values a thread) their epilogues spilled.
_H100_LOGITS = (
    (128, 128, 64, 8, 3),
    (128, 64, 64, 8, 4),
    (64, 128, 64, 8, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 64, 8, 2),  # 16 accumulator values a thread: unaligned operands (see the pruners)
    (64, 64, 8, 8, 2),  # fp32 (FMA dots): spill-free up to 8 scales; 16-deep tiles spilled 8-1500 B
)
# Gradient GEMMs (dh: K = V; dW: K = rows). (128, 256) spilled in dW at 8 chains.
_H100_GRAD = (
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 8, 3),  # fp32
    (64, 64, 32, 4, 3),  # fp32
)


def _configs(table) -> list:
    """``gemm_configs(table)`` without TMA twins and without the ``USE_TMA`` knob: these kernels
    load their operands through pointers only."""
    return [triton.Config({k: v for k, v in c.kwargs.items() if k != "USE_TMA"}, num_warps=c.num_warps,
                          num_stages=c.num_stages)
            for c in gemm_configs(table, ()) if not c.kwargs.get("USE_TMA")]


LOGIT_CONFIGS = _configs(_H100_LOGITS)
GRAD_CONFIGS = _configs(_H100_GRAD)


def _pruner(dtype_arg: str, acc_budget=None):
    """``make_gemm_pruner`` (blocks clamped to the extents registered under ``LAYOUT_KEY``, shared
    memory and register budgets, least wasted MMA work; its smaller budgets where ``ALIGN == 1``)
    over the configs of the input's dtype class (BLOCK_K <= 32 for fp32, 64 for 16-bit inputs),
    then at most ``acc_budget(args)`` fp32 accumulator values a thread (the smallest tile if none
    fits)."""
    base = make_gemm_pruner(dtype_arg)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wide = args[dtype_arg].element_size() >= 4
        mine = [c for c in configs if (c.kwargs["BLOCK_K"] <= 32) == wide]
        kept = base(mine or configs, named_args, **kwargs)
        if acc_budget is not None:
            budget = acc_budget(args)
            light = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= budget * 32 * c.num_warps]
            kept = light or [min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / c.num_warps)]
        return kept

    return prune


# Accumulator budgets of the logit kernels (fp32 values a thread; sm_90a, ptxas -v). 64 (the
# 128x128 / 8-warp tile) only for light epilogues: it spilled in dlogits with softcap (up to 220 B:
# the logit tile stays live beside tanh and D) or label smoothing (12 B), in the forward with
# softcap (136-152 B), with more than 16 per-scale state vectors (NS * (2 + label smoothing)), or
# with per-row scales (72 B at 2 scales; 255 registers and no spill at the bench shape). Plain,
# it takes 253-255 registers without spills in both kernels at the bench shape (bf16, V 32000,
# D 2048, 4 chains). Unaligned operands (ALIGN == 1: tiles loaded element by element through
# registers): 32 in the forward (no spill seen), 16 in dlogits, where every 32-value tile spilled
# with the options (200-760 B; fp16, widths 24/16, V 101, an odd row stride) and the 64x64 /
# 8-warp tile did not (175-241 registers). 16 scales with label smoothing and softcap still spill
# in every forward config (up to 188 B): a known limit.
def _fwd_budget(a) -> int:
    heavy = (int(a["ALIGN"]) == 1 or bool(a["ROWS"]) or bool(a["SOFTCAP"])
             or a["NUM_SCALES"] * (2 + int(bool(a["SMOOTH"]))) > 16)
    budget = 32 if heavy else 64
    # STORE (the fused path) keeps the logit tile's store beside it: 128x128 / 8 warps spilled
    # 124 B plain, the 32-value tiles 96-464 B with every option (unaligned fp16)
    return budget // 2 if a.get("STORE") else budget


def _dlogits_budget(a) -> int:
    if int(a["ALIGN"]) == 1:
        return 16
    return 32 if a["SOFTCAP"] or a["SMOOTH"] else 64


_fwd_pruner = _pruner("H", _fwd_budget)
_dlogits_pruner = _pruner("H", _dlogits_budget)
_dh_pruner = _pruner("G")
_dw_pruner = _pruner("G")


def logits_layout(kind: str, v: int, offsets, *extra) -> int:
    """Autotune key of a logit kernel (forward, dlogits): BLOCK_N tiles the vocabulary, BLOCK_K
    each chain's width; registered for the pruner."""
    widths = [b - a for a, b in zip(offsets, offsets[1:])]
    return register_gemm_layout(layout_key(kind, v, tuple(offsets), *extra), ("BLOCK_N", "BLOCK_K"),
                                [(v, w) for w in widths])


def grad_layouts(v: int, offsets) -> tuple:
    """Autotune keys of the dh GEMM (BLOCK_N over a chain's width, BLOCK_K over V) and the dW GEMM
    (BLOCK_M over V, BLOCK_N over a chain's width); registered for the pruner."""
    widths = [b - a for a, b in zip(offsets, offsets[1:])]
    dh = register_gemm_layout(layout_key("dh", v, tuple(offsets)), ("BLOCK_N", "BLOCK_K"), [(w, v) for w in widths])
    dw = register_gemm_layout(layout_key("dw", v, tuple(offsets)), ("BLOCK_M", "BLOCK_N"), [(v, w) for w in widths])
    return dh, dw


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _chain_k_tiles(TBL, n_scales, NUM_SCALES: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(starts, widths, k_tiles)``: the chains' first columns and widths as tuples of scalars and
    the number of BLOCK_K tiles of a K loop over the first ``n_scales`` chains (no tile straddles
    two chains)."""
    starts = ()
    widths = ()
    k_tiles = 0
    for j in tl.static_range(NUM_SCALES):
        w = load_int(TBL + NUM_SCALES, j, ALIGN)
        starts = starts + (load_int(TBL, j, ALIGN),)
        widths = widths + (w,)
        k_tiles += tl.where(j < n_scales, tl.cdiv(w, BLOCK_K), 0)
    return starts, widths, k_tiles


@triton.jit
def _pick(t, i):
    """``t[i]`` for a runtime index ``i`` (a chain of selects over the tuple)."""
    out = t[0]
    for j in tl.static_range(1, len(t)):
        out = tl.where(i == j, t[j], out)
    return out


@triton.jit
def _put(t, i, value):
    """Tuple ``t`` with entry ``i`` (a runtime index) replaced by ``value``."""
    out = ()
    for j in tl.static_range(len(t)):
        out = out + (tl.where(i == j, value, t[j]),)
    return out


@triton.jit
def _logit_k_tile(h_rows, w_cols, starts, widths, c, kc, m_ok, n_ok, BLOCK_K: tl.constexpr):
    """Operands of the K tile at column ``kc`` of chain ``c``: ``h[rows, .]`` ``(BLOCK_M,
    BLOCK_K)`` and ``W[cols, .]^T`` ``(BLOCK_K, BLOCK_N)``, masked to the chain; and whether this
    tile ends the chain (then the tile's logits are scale ``c``'s).

    The logit kernels run ONE K loop over every chain's tiles, with the per-scale epilogue under
    ``if`` at chain ends: one pipelined loop per chain (a static loop of K loops) kept every
    chain's prefetch state live and spilled registers on sm_90a (255 registers and up to 2 KB of
    spills per thread at 4 chains, against ~140-215 registers with one loop)."""
    lo = _pick(starts, c)
    width = _pick(widths, c)
    kk = kc + tl.arange(0, BLOCK_K)
    k_ok = kk < width
    a = tl.load(h_rows + (lo + kk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(w_cols + (lo + kk)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return a, b, kc + BLOCK_K >= width


@triton.jit
def _tanh(x):
    """fp32 tanh from exp (the interpreter has no libdevice): odd Taylor series below 1/8 (no
    cancellation), ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` above; about 1e-7 relative."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dlogits(x, s, pos64, rn, m_ok, valid, n_ok, tgt32, LSE, WT, N, V, stride_wf, stride_ws,
             label_smoothing, lse_square_scale, softcap, COUNTS, NUM_SCALES: tl.constexpr,
             SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr,
             ROW_WEIGHTS: tl.constexpr, ROWS: tl.constexpr):
    """``D_s`` (over alpha, fp32) of a tile from its scale-``s`` logits ``x`` and the saved lse
    (rows ``pos64`` of LSE and WT); 0 at ignored rows and (``ROWS``) at positions that do not
    reach ``s``."""
    if ROWS:
        valid = valid & (pos64 < rows_used(COUNTS, s, N, ROWS))
    lse = tl.load(LSE + pos64 * NUM_SCALES + s, mask=m_ok, other=0.0)
    if ROW_WEIGHTS:
        a = tl.load(WT + s * stride_ws + pos64, mask=m_ok, other=0.0)
        b = tl.load(WT + stride_wf + s * stride_ws + pos64, mask=m_ok, other=0.0)
    else:
        zero_rows = tl.zeros_like(lse)
        a = zero_rows + tl.load(WT + s * stride_ws)
        b = zero_rows + tl.load(WT + stride_wf + s * stride_ws)
    z = x
    if SOFTCAP:
        th = _tanh(x / softcap)
        z = softcap * th
    coef = a
    if ZLOSS:
        coef = a + 2.0 * lse_square_scale * lse * b
    d = tl.exp(z - lse[:, None]) * coef[:, None]
    hit = rn[None, :] == tgt32[:, None]
    if SMOOTH:
        d -= a[:, None] * (tl.where(hit, 1.0 - label_smoothing, 0.0) + label_smoothing / V)
    else:
        d -= tl.where(hit, a[:, None], 0.0)
    if SOFTCAP:
        d *= 1.0 - th * th
    return tl.where(valid[:, None] & n_ok[None, :], d, 0.0)


@triton.jit
def _repeat(value, n: tl.constexpr):
    out = ()
    for _ in tl.static_range(n):
        out = out + (value,)
    return out


# ----------------------------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------------------------
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 SXM: the interpreter and the compile-only checks plan for it


def _check(hidden, weight, targets, offsets, reduction):
    check_tensor("weight", weight, ndim=2)
    check_tensor("hidden", hidden, ndim=2, dtype=weight.dtype, device=weight.device)
    if targets.dtype != torch.int64 or targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be int64 of shape ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != hidden.shape[1] or \
            offsets[-1] > weight.shape[1] or any(a >= b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets {list(offsets)} must rise strictly from 0 to hidden.shape[1]="
                         f"{hidden.shape[1]} <= weight.shape[1]={weight.shape[1]}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _chain_table(offsets, device, element_size) -> Tuple[torch.Tensor, int]:
    """The ``(2, NS)`` table of chain starts and widths, and the ``ALIGN`` hint for them
    (elements per 16 bytes when every start and width is a multiple of it, else 1)."""
    starts, widths = list(offsets[:-1]), [b - a for a, b in zip(offsets, offsets[1:])]
    step = max(1, 16 // element_size)
    align = step if all(x % step == 0 for x in starts + widths) else 1
    return int64_table([starts, widths], device), align


def _align(align: int, *operands: torch.Tensor) -> int:
    """A kernel's ``ALIGN``: the table's, or 1 when a GEMM operand's base or row stride is not a
    16-byte multiple (its tiles then load through registers, element by element, and the pruners
    keep the configs whose registers allow that)."""
    return align if operands_tma_aligned(*operands) else 1


def _flags(label_smoothing, lse_square_scale, softcap):
    return dict(SOFTCAP=softcap > 0, SMOOTH=label_smoothing > 0, ZLOSS=lse_square_scale > 0)


def _n_counted(targets, ignore_index, row_chains=None, n_scales: int = 1) -> torch.Tensor:
    """The rows that count (not ignored) as an fp32 device scalar, or with ``row_chains`` per scale
    ``(n_scales,)`` (not ignored and reaching the scale): no host sync."""
    valid = targets != ignore_index
    if row_chains is None:
        return valid.sum().to(torch.float32)
    scales = torch.arange(n_scales, device=targets.device, dtype=row_chains.dtype)
    return (valid[None, :] & (row_chains[None, :] >= scales[:, None])).sum(1).to(torch.float32)
