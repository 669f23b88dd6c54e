"""Per-chain tables a kernel reads (host side), and the grid sizes they imply.

- ``int64_table`` / ``int32_table`` / ``clear_table_cache``: cached device tables
  (``colm_kernels._tables``, shared with the PyTorch backends).
- ``pointer_row``: the ``data_ptr()``s of a pointer table's tensors (declared to the GPU-semantics
  bounds checker, ``gpu_semantics``).
- ``table_aligned``: whether a table's pointers and ints allow 16-byte hints.
- ``tile_count``: the tiles of a list of per-chain extents (the grid ``segment_tile_count`` walks).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import triton

from .._tables import clear_table_cache, int32_table, int64_table
from .gpu_semantics import pointer_row

__all__ = ["int64_table", "int32_table", "clear_table_cache", "pointer_row", "table_aligned", "tile_count"]


def table_aligned(ptrs: Iterable[int], ints: Iterable[int], element_size: int) -> bool:
    """Whether every pointer is 16-byte aligned and every int (in elements) is a multiple of 16 B.

    When true a kernel may hint ``multiple_of(ptr, 16)`` and ``multiple_of(int, 16 // elsize)`` on
    values it reads from a table, which keeps its loads and stores vectorised.
    """
    step = max(1, 16 // element_size)
    return all(int(p) % 16 == 0 for p in ptrs) and all(int(v) % step == 0 for v in ints)


def tile_count(extents_a: Sequence[int], block_a: int,
               extents_b: Optional[Sequence[int]] = None, block_b: int = 1) -> int:
    """``sum_c cdiv(a_c, block_a) * cdiv(b_c, block_b)``: the same count ``segment_tile_count``
    computes in a kernel (host side, for the grid)."""
    if extents_b is None:
        return sum(triton.cdiv(a, block_a) for a in extents_a)
    return sum(triton.cdiv(a, block_a) * triton.cdiv(b, block_b) for a, b in zip(extents_a, extents_b))
