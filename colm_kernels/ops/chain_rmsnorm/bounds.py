"""What each backend of ``chain_rmsnorm`` executes on an H100, for ``auto``
(``colm_kernels.auto_bounds``): no tensor-core work, so bytes decide.

The minimum: forward reads x and the gain and writes y; backward reads dy, x and the saved rstd
and writes dx and the gain's gradient. Each kernel's reads of x (and dy) per row, as written:
- ``cuda`` (``csrc/chain_rmsnorm``): two passes over a row's items (statistics, then output), the
  second re-reading them from global memory (L1/L2 may serve it: a GPU timing decides that);
- ``triton``: one pass while the widest chain fits in registers (4096 columns), else two
  (``triton_kernels.x_reads_per_row``).
"""
from __future__ import annotations

from typing import Dict, Optional

from ...auto_bounds import Bound, concrete_shape, dtype_name, needs_grad, pow2_bucket

CUDA_X_READS = 2


def _bytes(m: int, width: int, es: int, x_reads: int, train: bool) -> int:
    row = m * width * es
    fwd = x_reads * row + row + width * es + m * 4  # x, y, gain, rstd (fp32 per row and chain)
    if not train:
        return fwd
    return fwd + 2 * x_reads * row + row + width * 4  # dy and x, dx, the gain's fp32 gradient


def bounds(x, weight, offsets, eps, row_chains=None) -> Dict[str, Bound]:
    xs = concrete_shape(x)
    if xs is None:
        return {}
    from .triton_kernels import x_reads_per_row

    m, width, es, train = xs[0], int(offsets[-1]), x.element_size(), needs_grad(x, weight)
    reads = x_reads_per_row(offsets)
    return {"triton": Bound({}, _bytes(m, width, es, reads, train), f"x read {reads}x per row"),
            "cuda": Bound({}, _bytes(m, width, es, CUDA_X_READS, train), f"x read {CUDA_X_READS}x per row")}


def shape_class(x, weight, offsets, eps, row_chains=None) -> Optional[str]:
    """Timing-table key: dtype, width (power of two), training or not."""
    return f"{dtype_name(x)}-W{pow2_bucket(int(offsets[-1]))}-{'train' if needs_grad(x, weight) else 'infer'}"
