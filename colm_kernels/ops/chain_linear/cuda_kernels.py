"""Chain-of-Linear on cuBLAS: thin launchers over the CUDA extension (``csrc/chain_linear``).

Math (COLM_SPEC section 2). Chain i has ``W_i (d_i, P_i)``, ``1 <= P_1 <= ... <= P_n``, optional
``b_i (d_i,)``; ``o_i = d_1 + ... + d_(i-1)``, ``N = sum d_i``, ``dy_i = dy[:, o_i:o_i+d_i]``:

    forward   y[:, o_i:o_i+d_i] = x[:, :P_i] @ W_i^T + b_i          x (M, K >= P_n) -> y (M, N)
    input     dx[:, :P_i] += dy_i @ W_i, summed over chains          dx (M, K), zeros past P_n
    weight    dW_i = dy_i^T @ x[:, :P_i]                             (d_i, P_i) contiguous
    bias      db_i = sum over rows of dy_i                           (d_i,)

Grouped cuBLAS GEMMs with fp32 accumulation (``csrc/chain_linear/chain_linear.cu`` documents the
decomposition); float32 / float16 / bfloat16, every tensor one dtype on one CUDA device; float32
uses TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set (off by default, as torch).
``x`` / ``dy`` may have any row stride (a non-unit last-dim stride is copied away); weights are
separate tensors or views of one dense matrix, read in place. Outputs are contiguous.

The extension is loaded on first call: ``RuntimeError`` naming the reason when it cannot be used.
``COLM_KERNELS_CHAIN_LINEAR_GEMM=loop`` makes the extension issue one cuBLAS GEMM per chain
instead of grouped calls (a baseline for tests and benchmarks).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ... import _cuda

__all__ = ["chain_linear_fwd", "chain_linear_bwd_dx", "chain_linear_bwd_dw"]

_FUNCTIONS = ("chain_linear_fwd", "chain_linear_bwd_dx", "chain_linear_bwd_dw")


def missing_reason() -> str | None:
    """Why the extension cannot run chain_linear (None when it can)."""
    return _cuda.functions_unavailable_reason("chain_linear", _FUNCTIONS)


def _extension():
    reason = missing_reason()
    if reason:
        raise RuntimeError(f"colm_kernels CUDA backend is unavailable: {reason}")
    return _cuda.load_extension()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A layout cuBLAS can read: unit stride along the last dimension and, in 2-D, rows that do
    not overlap (row stride >= width); anything else (a broadcast grad, say) is copied."""
    if t.dim() == 0:
        return t
    if t.size(-1) > 1 and t.stride(-1) != 1:
        return t.contiguous()
    if t.dim() == 2 and t.size(0) > 1 and t.stride(0) < t.size(1):
        return t.contiguous()
    return t


def _weights(weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [_rows(w) for w in weights]


# Per-row scales (``row_chains``) are declined (``cuda.not_supported_reasons``): cuBLAS takes one
# M per GEMM, so it could only compute every row at full width and zero the rest, where the Triton
# kernels skip that work. The launchers take the argument for the shared op signature only.
def _no_rows(row_chains: Optional[torch.Tensor]) -> None:
    if row_chains is not None:
        raise ValueError("the cuda chain_linear kernels do not take per-row scales (seq_chains): use triton")


def chain_linear_fwd(x: torch.Tensor, weights: Sequence[torch.Tensor],
                     biases: Sequence[torch.Tensor] = (), row_chains: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """``y = cat_i(x[:, :P_i] @ W_i^T + b_i)``; ``biases`` empty or one ``(d_i,)`` per chain."""
    _no_rows(row_chains)
    return _extension().chain_linear_fwd(_rows(x), _weights(weights), [_rows(b) for b in biases])


def chain_linear_bwd_dx(dy: torch.Tensor, weights: Sequence[torch.Tensor], in_features: int,
                        row_chains: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dx (M, in_features)``: ``sum_i dy_i @ W_i`` in columns ``[0, P_i)``, zeros past ``P_n``."""
    _no_rows(row_chains)
    return _extension().chain_linear_bwd_dx(_rows(dy), _weights(weights), int(in_features))


def chain_linear_bwd_dw(
    dy: torch.Tensor,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    needs_weight: Sequence[bool],
    needs_bias: Sequence[bool],
    row_chains: Optional[torch.Tensor] = None,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(dW, db)``, one entry per chain: ``dW_i (d_i, P_i)``, ``db_i (d_i,)``, and a fresh empty
    ``(0,)`` tensor where the gradient is not needed (no work is done for it). Only the weights'
    shapes are read."""
    _no_rows(row_chains)
    dws, dbs = _extension().chain_linear_bwd_dw(
        _rows(dy), _rows(x), _weights(weights), [bool(f) for f in needs_weight],
        [bool(f) for f in needs_bias],
    )
    return list(dws), list(dbs)


missing_reason()  # at import (backends.preload_available), never first inside a torch.compile trace
