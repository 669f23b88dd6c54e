"""Per-row scales in Triton kernels (elastic batches, ``row_chains``: one scale per row).

A kernel that skips the work of chains a row does not reach sees its rows through a plan:

- ``row_plan`` (host): the rows sorted by decreasing scale (``ORDER``, int32 row indices) and, per
  block the kernel launches for (a chain), how many rows reach it (``COUNTS``). Those rows are a
  prefix of the sorted order, so a tile of sorted positions past a block's count has no work for
  that block, and a loop over rows can stop at the count.
- ``sorted_rows`` (device): the row index of sorted positions and whether each reaches a block.
- ``rows_used`` (device): how many sorted positions reach a block.
- ``blocks_reached`` (device): how many of the leading blocks the row at a sorted position
  reaches (the counts fall with the chain), i.e. where a tile's loop over chains may stop.

Without ``ROWS`` (a constexpr) the plan is the identity: positions are rows and every row reaches
every block; the placeholder tensors are never read.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .tables import int32_table

__all__ = ["row_plan", "sorted_rows", "rows_used", "blocks_reached"]


def row_plan(row_chains: Optional[torch.Tensor], blocks: Sequence[int], M: int, device):
    """``(ROWS, ORDER, COUNTS)`` kernel arguments for per-row scales: the rows sorted by
    decreasing scale (int32 indices, stable) and, per launched block, how many rows reach its
    chain ``blocks[b]`` (a prefix of that order). No host sync. Without ``row_chains``:
    ``(False, t, t)`` with a placeholder tensor the kernels never read."""
    if row_chains is None:
        placeholder = int32_table([[0]], device)
        return False, placeholder, placeholder
    if (not isinstance(row_chains, torch.Tensor) or row_chains.dtype != torch.int32
            or tuple(row_chains.shape) != (M,) or row_chains.device != torch.device(device)):
        raise ValueError(f"row_chains must be an int32 tensor of shape ({M},) on {device}, got "
                         f"{getattr(row_chains, 'dtype', type(row_chains).__name__)} "
                         f"{tuple(getattr(row_chains, 'shape', ()))}")
    order = torch.argsort(row_chains, descending=True, stable=True).to(torch.int32)
    chain_of = int32_table([list(blocks)], device)[0]
    counts = (row_chains[None, :] >= chain_of[:, None]).sum(1, dtype=torch.int32)
    return True, order, counts


@triton.jit
def sorted_rows(ORDER, COUNTS, block, pos, M, ROWS: tl.constexpr):
    """(row index, whether the row uses ``block``'s chain) of sorted positions ``pos``: the row
    itself without ``ROWS``; else ``ORDER[pos]``, active for the first ``COUNTS[block]``."""
    valid = pos < M
    if ROWS:
        row = tl.load(ORDER + pos, mask=valid, other=0)
        used = pos < tl.load(COUNTS + block)
    else:
        row = pos
        used = valid
    return row.to(tl.int64), used & valid


@triton.jit
def rows_used(COUNTS, block, M, ROWS: tl.constexpr):
    """How many sorted positions use ``block``'s chain (all ``M`` without ``ROWS``)."""
    if ROWS:
        n = tl.load(COUNTS + block)
    else:
        n = M
    return n


@triton.jit
def blocks_reached(COUNTS, start, NUM_BLOCKS: tl.constexpr, ROWS: tl.constexpr):
    """How many of the blocks ``0..NUM_BLOCKS-1`` (chains, in order, so their counts do not rise)
    the row at sorted position ``start`` reaches: the largest scale of a tile that starts there,
    plus one. ``NUM_BLOCKS`` without ``ROWS``."""
    if ROWS:
        n = start * 0
        for b in tl.static_range(NUM_BLOCKS):
            n += (start < tl.load(COUNTS + b)).to(tl.int32)
    else:
        n = NUM_BLOCKS
    return n
