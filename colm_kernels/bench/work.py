"""Work accounting: the tensor-core FLOPs a Triton kernel really executes, counted in Triton's
interpreter, beside the useful FLOPs of the op (what the math needs).

On a GPU every ``tl.dot`` of a program runs on whole tiles, masked or not, so the executed FLOPs
are ``2 * M * N * K`` per ``tl.dot`` per program. The interpreter runs every program of the grid
and every ``tl.dot`` in it, so counting its dots counts exactly what the GPU would execute, provided
the kernels pick their H100 tiles: set ``COLM_KERNELS_TILES=gpu`` (with ``TRITON_INTERPRET=1``)
before the kernels are imported. ``COLM_KERNELS_AUTOTUNE=0`` then runs the first config each
pruner keeps (what a GPU test run uses); ``force_config(i)`` pins another.

    with count_mma_flops() as work:
        chain_linear(x, w, None, chains)
    work.total, work.by_kernel  # FLOPs

The useful-FLOP formulas of each op and pass live here too, so the static report and the tests
share one definition (COLM_SPEC sections 2-4).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Dict, Iterator, Sequence

__all__ = ["MmaWork", "count_mma_flops", "chain_gemm_flops", "attention_flops"]

_LOCK = threading.Lock()


@dataclasses.dataclass
class MmaWork:
    """Executed ``tl.dot`` FLOPs, in total and per kernel (by the kernel function's name)."""

    by_kernel: Dict[str, int] = dataclasses.field(default_factory=dict)
    dots: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())

    def add(self, kernel: str, flops: int) -> None:
        self.by_kernel[kernel] = self.by_kernel.get(kernel, 0) + flops
        self.dots += 1


@contextlib.contextmanager
def count_mma_flops() -> Iterator[MmaWork]:
    """Count ``2 * M * N * K`` for every ``tl.dot`` the interpreter executes inside the block
    (batched dots count each batch). Needs ``TRITON_INTERPRET=1``; not re-entrant."""
    from .._triton.device import is_interpreter

    if not is_interpreter():
        raise RuntimeError("count_mma_flops counts in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    from triton.runtime import interpreter

    work = MmaWork()
    builder_cls, executor_cls = interpreter.InterpreterBuilder, interpreter.GridExecutor
    real_dot, real_call = builder_cls.create_dot, executor_cls.__call__
    current = ["?"]  # the kernel whose programs are running

    def create_dot(self, a, b, *args, **kwargs):
        *batch, m, k = a.data.shape
        n = b.data.shape[-1]
        work.add(current[0], 2 * m * n * k * math.prod(batch))
        return real_dot(self, a, b, *args, **kwargs)

    def call(self, *args, **kwargs):
        saved, current[0] = current[0], getattr(self.fn, "__name__", "?")
        try:
            return real_call(self, *args, **kwargs)
        finally:
            current[0] = saved

    if not _LOCK.acquire(blocking=False):
        raise RuntimeError("count_mma_flops is already counting (it is not re-entrant)")
    builder_cls.create_dot, executor_cls.__call__ = create_dot, call
    try:
        yield work
    finally:
        builder_cls.create_dot, executor_cls.__call__ = real_dot, real_call
        _LOCK.release()


# ----------------------------------------------------------------------------------------------
# Useful FLOPs (what the math needs; masked-out blocks and tiles excluded)
# ----------------------------------------------------------------------------------------------
def chain_gemm_flops(tokens: int, in_prefixes: Sequence[int], out_widths: Sequence[int]) -> int:
    """One block-lower-triangular GEMM (a Chain-of-Linear forward, dX or dW pass):
    ``2 * M * sum_i d_i_out * P_i_in`` (COLM_SPEC section 2)."""
    return 2 * tokens * sum(d * p for d, p in zip(out_widths, in_prefixes))


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    matmuls: int = 2) -> int:
    """``matmuls`` products of ``(Sq, D) x (D, Sk)`` size over the visible (query, key) pairs of
    every head: 2 in the forward (QK^T, PV), 5 in the FlashAttention-2 backward (QK^T recomputed,
    dP = dO V^T, dV, dK, dQ). Causal is bottom-right aligned, as the kernels are."""
    if causal:
        # query i sees keys j <= i + (Sk - Sq), clipped to [0, Sk]
        shift = seq_k - seq_q
        pairs = sum(min(seq_k, max(0, i + shift + 1)) for i in range(seq_q))
    else:
        pairs = seq_q * seq_k
    return matmuls * 2 * batch * heads * pairs * head_dim
