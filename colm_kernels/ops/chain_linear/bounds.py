"""What each backend of ``chain_linear`` executes on an H100, for ``auto``
(``colm_kernels.auto_bounds``).

Both backends compute the lower blocks only (``2 * M * sum_i d_i * P_i`` per GEMM: forward, and dX
and dW when the call will be differentiated), 16-bit inputs on wgmma (cuBLAS; Triton's kept configs,
``colm-bench --static``). fp32 inputs: Triton multiplies in IEEE fp32 on FMA units; cuBLAS too,
unless ``torch.backends.cuda.matmul.allow_tf32`` lets it use TF32 tensor cores. Bytes: each GEMM
reads its two operands and writes its output once, except cuBLAS's dX over separate weight blocks
(``ChainLinear``'s ``mlps.{i}.weight``): one grouped GEMM per block diagonal, each after the first
reading and rewriting the dX segments it adds to (``csrc/chain_linear/chain_linear.cu``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ...auto_bounds import Bound, concrete_shape, dtype_name, needs_grad, pow2_bucket


def _views_of_one_matrix(weights) -> bool:
    """Weight blocks that are row slices of one dense matrix (the CUDA dX then reads it in place)."""
    base = weights[0]._base
    return len(weights) == 1 or (base is not None and all(w._base is base for w in weights))


def bounds(x, weights, biases, row_chains=None) -> Dict[str, Bound]:
    xs, ws = concrete_shape(x), [concrete_shape(w) for w in weights]
    if xs is None or any(s is None for s in ws):
        return {}
    m, es = xs[0], x.element_size()
    widths, prefixes = [s[0] for s in ws], [s[1] for s in ws]
    flops = 2 * m * sum(d * p for d, p in zip(widths, prefixes))
    w_bytes = sum(d * p for d, p in zip(widths, prefixes)) * es
    x_bytes, y_bytes = m * prefixes[-1] * es, m * sum(widths) * es
    nbytes, passes = x_bytes + w_bytes + y_bytes, 1
    extra = 0
    if needs_grad(x, *weights):
        passes = 1 + int(x.requires_grad) + int(any(w.requires_grad for w in weights))
        nbytes *= passes
        if x.requires_grad and not _views_of_one_matrix(weights):
            segments = [b - a for a, b in zip([0] + prefixes[:-1], prefixes)]
            n = len(segments)
            extra = sum((n - 1 - j) * 2 * m * s * es for j, s in enumerate(segments))
    if es == 4:
        triton_kind = "fp32_fma"
        cuda_kind = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32_fma"
    else:
        triton_kind = cuda_kind = "wgmma"
    note = "dX segments re-read per block diagonal" if extra else ""
    return {"triton": Bound({triton_kind: passes * flops}, nbytes),
            "cuda": Bound({cuda_kind: passes * flops}, nbytes + extra, note)}


def shape_class(x, weights, biases, row_chains=None) -> Optional[str]:
    """Timing-table key: dtype, rows (power of two), weight layout, training or not."""
    xs = concrete_shape(x)
    if xs is None:
        return None
    layout = "dense" if _views_of_one_matrix(weights) else "blocks"
    mode = "train" if needs_grad(x, *weights) else "infer"
    return f"{dtype_name(x)}-M{pow2_bucket(xs[0])}-{layout}-{mode}"
