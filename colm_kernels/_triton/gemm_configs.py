"""Autotune configurations of the tiled GEMM kernels (chain linear, SwiGLU, cross-entropy) and
the pruner that fits them to a chain layout.

- ``gemm_configs``: the H100 list (pointer configs, then their TMA twins), one small config under
  the interpreter's small tiles.
- ``layout_key`` / ``register_gemm_layout`` / ``make_gemm_pruner``: a launch registers, under its
  ``LAYOUT_KEY`` (``layout_key(parts)``),
  the extents its blocks tile; the pruner clamps blocks to them, keeps configs within the measured
  shared-memory and register budgets (``SMEM_BUDGET``, ``MAX_ACC_REGS``, ``UNALIGNED_*``), drops
  those that waste MMA work on partial tiles (``gemm_waste``; never a function of the token count)
  and offers TMA twins only where descriptors are legal (``tma``).
"""
from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Sequence

import triton

from . import tma
from .device import small_tiles
from .tma import tma_choices, tma_legal

__all__ = ["gemm_configs", "layout_key", "register_gemm_layout", "gemm_waste", "make_gemm_pruner", "SMEM_BUDGET",
           "MAX_ACC_REGS", "UNALIGNED_MAX_LOAD_ELEMS", "UNALIGNED_MAX_ACC_REGS"]


# Autotune configurations. Block names are the GEMM roles: BLOCK_M x BLOCK_N output tile,
# BLOCK_K the reduction step. (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), GROUP_M = 8.
_H100_GEMM = (
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),  # fp32 inputs: fits shared memory where the 64-deep ones do not
    (64, 64, 32, 4, 3),
)
# TMA twins (``USE_TMA=True``): the same tiles with operands fetched by the Tensor Memory
# Accelerator (cp.async.bulk.tensor into swizzled shared memory, no per-thread addresses, zero fill
# past the edges instead of masks). 16-bit inputs only (``tma_legal``): fp32 dots are IEEE FMA
# loops, not wgmma, so the fp32-only 32-deep rows above have no twin.
_H100_GEMM_TMA = tuple(row for row in _H100_GEMM if row[2] == 64)
_INTERPRETER_GEMM = ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, 1, 1)


def gemm_configs(h100_table: Sequence[tuple] = _H100_GEMM,
                 tma_table: Sequence[tuple] = _H100_GEMM_TMA) -> List[triton.Config]:
    """Autotune configs for tiled GEMMs from ``h100_table`` rows (BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages; GROUP_M 8) with ``USE_TMA`` False, then the ``tma_table`` rows with
    ``USE_TMA`` True (pointer configs first: ``COLM_KERNELS_AUTOTUNE=0`` runs the first kept one).
    Under the interpreter one 16x16x16 config (GROUP_M 4; small tiles keep masking paths exercised
    and the interpreter fast) and its TMA twin, which the pruner offers only in
    ``tma_mode("only")``. An empty ``tma_table`` (a kernel without a ``USE_TMA`` parameter) gives
    configs without the ``USE_TMA`` key."""
    twins = (False, True) if tma_table else (None,)

    def tagged(kw, tma):
        return kw if tma is None else {**kw, "USE_TMA": tma}

    if small_tiles():
        kw, warps, stages = _INTERPRETER_GEMM
        return [triton.Config(tagged(kw, tma), num_warps=warps, num_stages=stages) for tma in twins]
    tables = ((h100_table, False), (tma_table, True)) if tma_table else ((h100_table, None),)
    return [
        triton.Config(tagged({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, tma),
                      num_warps=w, num_stages=s)
        for table, tma in tables
        for bm, bn, bk, w, s in table
    ]



SMEM_BUDGET = 227 * 1024  # bytes of shared memory per block on H100 (sm_90)


# Per-thread register budgets of the pruner, measured on sm_90a with Triton's ptxas (``colm-bench
# --static``; tests/ops/test_static_report.py holds every kept config at zero spills):
# - fp32 accumulator registers per thread (all accumulators together): a 128 x 256 tile over 8 warps
#   (128 regs) compiles without spills with one accumulator; kernels with more live state pass a
#   smaller budget.
# - unaligned layouts (ALIGN == 1: no 16-byte hints, so operands are loaded element by element
#   through registers instead of asynchronous copies): at most 48 operand elements per thread per
#   stage and 64 accumulator registers; beyond that ptxas spills (up to 872 B seen).
MAX_ACC_REGS = 128
UNALIGNED_MAX_LOAD_ELEMS = 48
UNALIGNED_MAX_ACC_REGS = 64

_GEMM_LAYOUTS: "OrderedDict[int, tuple]" = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()
_GEMM_LAYOUTS_SIZE = 4096


@functools.lru_cache(maxsize=4096)
def layout_key(*parts) -> int:
    """A stable int (the same in every process) naming a launch's layout for the autotune cache and
    ``register_gemm_layout``: the parts (kind, chain widths, dims, options), never the token count."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=7).digest(), "little")


def register_gemm_layout(key: int, blocks: Sequence[str], products: Iterable[Sequence[int]]) -> int:
    """Tell the GEMM pruner what the blocks of a launch with autotune key ``LAYOUT_KEY == key`` tile:
    ``products`` lists, for every (chain, segment) sub-GEMM, its extent along each of ``blocks``
    (e.g. ``("BLOCK_N", "BLOCK_K")`` and ``(d_i, P_i)`` per chain). Host ints only, so pruning
    never reads a device table. Returns ``key``."""
    with _LAYOUTS_LOCK:
        _GEMM_LAYOUTS[int(key)] = (tuple(blocks), tuple(tuple(int(e) for e in p) for p in products))
        _GEMM_LAYOUTS.move_to_end(int(key))
        while len(_GEMM_LAYOUTS) > _GEMM_LAYOUTS_SIZE:
            _GEMM_LAYOUTS.popitem(last=False)
    return key


def gemm_waste(blocks: Sequence[str], products: Sequence[Sequence[int]], kw: Dict[str, int]) -> float:
    """Executed over useful MMA work of a layout's tiles with block sizes ``kw``: every sub-GEMM
    runs whole tiles along each block (masked tiles still run on the tensor cores)."""
    useful = sum(_prod(p) for p in products)
    executed = sum(_prod(-(-e // kw[b]) * kw[b] for b, e in zip(blocks, p)) for p in products)
    return executed / max(1, useful)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def make_gemm_pruner(dtype_arg: str, *, n_acc: int = 1, n_b: int = 1, max_acc_regs: int = MAX_ACC_REGS,
                     smem_budget: int = SMEM_BUDGET) -> Callable:
    """An ``early_config_prune`` for GEMM kernels whose layout was registered with
    ``register_gemm_layout`` under their ``LAYOUT_KEY`` argument.

    ``n_acc`` fp32 accumulator tiles of BLOCK_M x BLOCK_N, and per pipeline stage one BLOCK_M x
    BLOCK_K operand tile plus ``n_b`` BLOCK_K x BLOCK_N tiles. Steps:
    1. every registered block is clamped to ``max(16, next_pow2(largest extent))``; duplicates go;
    2. configs over the shared-memory budget (per ``dtype_arg``'s element size) or the register
       budgets above (accumulators; operand staging when ``ALIGN == 1``) go;
    3. of the rest, only those within 2% of the least wasted MMA work (``gemm_waste``) stay, so a
       block that does not divide the chain widths is never picked over one that does.
    Before all that, configs whose ``USE_TMA`` the current ``tma_mode`` does not offer for this
    launch go (TMA only where ``tma_legal``). The smallest config survives if every one is dropped.
    Depends only on the autotune key (layout, ALIGN, TMA_OPERANDS, ROWS, dtype), never on the token
    count.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        es = args[dtype_arg].element_size()
        blocks, products = _GEMM_LAYOUTS.get(int(args["LAYOUT_KEY"]), ((), ()))
        unaligned = int(args.get("ALIGN", 1)) == 1
        offered = tma_choices(tma_legal(args, es, args[dtype_arg].device))
        sized, seen = [], set()
        for cfg in configs:
            kw = dict(cfg.kwargs)
            if bool(kw.get("USE_TMA", False)) not in offered:
                continue
            for block in blocks:
                largest = max((p[blocks.index(block)] for p in products), default=1)
                kw[block] = min(kw[block], max(16, triton.next_power_of_2(max(1, largest))))
            stages, warps = max(1, cfg.num_stages), cfg.num_warps
            key = (tuple(sorted(kw.items())), warps, stages)
            if key in seen:
                continue
            seen.add(key)
            smem = (kw["BLOCK_M"] + n_b * kw["BLOCK_N"]) * kw["BLOCK_K"] * es * stages
            acc_regs = n_acc * kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * warps)
            load_elems = (kw["BLOCK_M"] + n_b * kw["BLOCK_N"]) * kw["BLOCK_K"] // (32 * warps)
            fits = smem <= smem_budget and acc_regs <= max_acc_regs
            if unaligned:
                fits = fits and load_elems <= UNALIGNED_MAX_LOAD_ELEMS and acc_regs <= UNALIGNED_MAX_ACC_REGS
            waste = gemm_waste(blocks, products, kw) if products else 1.0
            sized.append((fits, waste, smem + 1024 * acc_regs,
                          triton.Config(kw, num_warps=warps, num_stages=cfg.num_stages)))
        if not sized:
            raise ValueError(f"no autotune config offers USE_TMA in {offered} (tma_mode {tma.current_mode()!r}): "
                             "a GEMM config list needs pointer configs")
        fitting = [t for t in sized if t[0]]
        if not fitting:
            return [min(sized, key=lambda t: (t[1], t[2]))[3]]
        least = min(t[1] for t in fitting)
        return [t[3] for t in fitting if t[1] <= least * 1.02]

    return prune
