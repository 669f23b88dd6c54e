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

``count_memory_traffic()`` counts, the same way, the bytes every kernel loads, stores and updates
atomically in global memory: each load / store / atomic instruction of each program counts the
distinct addresses its active lanes touch times the element size (masked-off lanes move nothing;
a TMA box counts only its elements inside the tensor; lanes that repeat one address count once,
as one transaction). It counts what the kernels request, L2 hits included: an upper bound on HBM
traffic, exact when no program re-reads what an earlier one brought into L2.

    with count_memory_traffic() as traffic:
        chain_rmsnorm(x, w, chains)
    traffic.total, traffic.by_kernel, traffic.loads  # bytes

The useful-FLOP formulas of each op and pass live here too, beside the minimum bytes (each input
read once, each output written once), so the static report and the tests share one definition
(COLM_SPEC sections 2-4).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Dict, Iterator, List, Optional, Sequence

__all__ = ["MmaWork", "count_mma_flops", "MemoryTraffic", "count_memory_traffic", "chain_gemm_flops",
           "attention_flops", "rmsnorm_min_bytes", "decode_min_bytes", "gemm_tiled_read_bytes"]

_LOCK = threading.Lock()
_TRAFFIC_LOCK = threading.Lock()


def _require_interpreter(what: str) -> None:
    from .._triton.device import is_interpreter

    if not is_interpreter():
        raise RuntimeError(f"{what} counts in Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported")


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
    _require_interpreter("count_mma_flops")
    from triton.runtime import interpreter

    from .._triton.gpu_semantics import current_kernel, track_launches

    work = MmaWork()
    builder_cls = interpreter.InterpreterBuilder
    real_dot = builder_cls.create_dot

    def create_dot(self, a, b, *args, **kwargs):
        *batch, m, k = a.data.shape
        n = b.data.shape[-1]
        work.add(current_kernel(), 2 * m * n * k * math.prod(batch))
        return real_dot(self, a, b, *args, **kwargs)

    if not _LOCK.acquire(blocking=False):
        raise RuntimeError("count_mma_flops is already counting (it is not re-entrant)")
    builder_cls.create_dot = create_dot
    try:
        with track_launches():  # the launch hooks of gpu_semantics name the running kernel
            yield work
    finally:
        builder_cls.create_dot = real_dot
        _LOCK.release()


@dataclasses.dataclass
class MemoryTraffic:
    """Global-memory bytes per kernel (by the kernel function's name): loaded, stored and updated
    by atomics (an atomic read-modify-write counts its element once); and per launch, in order,
    ``{"kernel", "grid", "meta" (its scalar keyword arguments: the config), "bytes", "reads"}``
    where ``reads`` holds the bytes it loaded from each tensor named in ``count_memory_traffic``."""

    loads: Dict[str, int] = dataclasses.field(default_factory=dict)
    stores: Dict[str, int] = dataclasses.field(default_factory=dict)
    atomics: Dict[str, int] = dataclasses.field(default_factory=dict)
    launches: List[dict] = dataclasses.field(default_factory=list)
    tensors: Dict[str, tuple] = dataclasses.field(default_factory=dict)  # name -> (first, end) byte
    _open: dict = dataclasses.field(default_factory=lambda: {"bytes": 0, "reads": {}})

    @property
    def by_kernel(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for table in (self.loads, self.stores, self.atomics):
            for k, v in table.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())

    def add(self, kernel: str, kind: str, addrs, size: int) -> None:
        import numpy as np

        if not addrs.size:
            return
        addrs = np.unique(addrs)
        nbytes = int(addrs.size) * size
        table = {"load": self.loads, "store": self.stores}.get(kind, self.atomics)
        table[kernel] = table.get(kernel, 0) + nbytes
        self._open["bytes"] += nbytes
        if kind == "load":
            for name, (lo, hi) in self.tensors.items():
                n = int(np.count_nonzero((addrs >= lo) & (addrs < hi))) * size
                if n:
                    self._open["reads"][name] = self._open["reads"].get(name, 0) + n

    def launched(self, kernel: str, grid, meta: dict) -> None:
        self.launches.append({"kernel": kernel, "grid": tuple(grid), "meta": meta, **self._open})
        self._open = {"bytes": 0, "reads": {}}


@contextlib.contextmanager
def count_memory_traffic(tensors: Optional[Dict[str, object]] = None) -> Iterator[MemoryTraffic]:
    """Count the global-memory bytes every kernel the interpreter runs inside the block loads,
    stores and updates atomically (see the module docstring); per launch, the bytes loaded from
    each of ``tensors`` (name -> tensor: its storage's bytes). It rides on the interpreter hooks
    of ``colm_kernels._triton.gpu_semantics`` (the bounds checker's), so it composes with the
    emulation and with ``count_mma_flops``. Needs ``TRITON_INTERPRET=1``; not re-entrant."""
    _require_interpreter("count_memory_traffic")
    from .._triton.gpu_semantics import observe_accesses

    if not _TRAFFIC_LOCK.acquire(blocking=False):
        raise RuntimeError("count_memory_traffic is already counting (it is not re-entrant)")
    traffic = MemoryTraffic()
    for name, t in (tensors or {}).items():
        st = t.untyped_storage()
        traffic.tensors[name] = (st.data_ptr(), st.data_ptr() + st.nbytes())
    try:
        with observe_accesses(traffic.add, traffic.launched):
            yield traffic
    finally:
        _TRAFFIC_LOCK.release()


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


# ----------------------------------------------------------------------------------------------
# Minimum bytes (each input read once, each output written once; auxiliary tensors a kernel
# chooses to save, such as RMSNorm's rstd, are not part of the minimum)
# ----------------------------------------------------------------------------------------------
def rmsnorm_min_bytes(rows: int, width: int, es: int, backward: bool = False) -> int:
    """Per-chain RMSNorm (COLM_SPEC section 3): forward reads ``x (M, W)`` and the gain ``(W,)``,
    writes ``y (M, W)``: ``(2 M W + W) * es``; backward reads ``dy``, ``x``, the gain, writes ``dx``
    and ``dgain``: ``(3 M W + 2 W) * es``."""
    return (3 * rows * width + 2 * width) * es if backward else (2 * rows * width + width) * es


def decode_min_bytes(batch: int, new_tokens: int, n_q: int, kv_heads: int, cached: Sequence[int],
                     head_dim: int, es: int) -> int:
    """One decode step of chain attention over a KV cache (COLM_SPEC sections 4, 6): every kv head
    the step reads (``kv_heads``: the largest index the head map uses, plus one) has its K and V
    rows read once up to each sequence's cached length, the queries read and the outputs written
    once: ``(2 * sum_b L_b * kv_heads * D + 2 * B * Sq * Hq * D) * es`` (the per-sequence lengths
    and a block table are a few bytes, left out)."""
    return (2 * sum(cached) * kv_heads * head_dim + 2 * batch * new_tokens * n_q * head_dim) * es


def gemm_tiled_read_bytes(m: int, n: int, k: int, block_m: int, block_n: int, a_es: int, b_es: int) -> int:
    """Operand bytes a tiled ``(m, k) @ (k, n)`` GEMM without operand reuse across programs reads:
    each of its ``cdiv(n, block_n)`` columns of programs reads all of ``A`` once and each of its
    ``cdiv(m, block_m)`` rows of programs all of ``B`` once:
    ``cdiv(n, BN) * m * k * a_es + cdiv(m, BM) * n * k * b_es``."""
    return -(-n // block_n) * m * k * a_es + -(-m // block_m) * n * k * b_es
