"""``chain_linear``'s ``cuda`` backend: the cuBLAS launchers of ``cuda_kernels`` as custom ops
(``chain_linear_cuda``, ``..._bwd_dx``, ``..._bwd_dw``; see ``backend_ops``)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import cuda_kernels as kernels
from .backend_ops import define_backend_ops

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEQ_CHAINS_DECLINED = ("cuda chain_linear does not take seq_chains: cuBLAS would compute every row at full "
                       "width and zero the rest; the triton kernels skip the inactive rows' work")
_ops = define_backend_ops("cuda", kernels)
chain_linear_cuda = _ops.forward
chain_linear_cuda_bwd_dx = _ops.bwd_dx
chain_linear_cuda_bwd_dw = _ops.bwd_dw


def not_supported_reasons(x: Tensor, weights, biases, row_chains=None) -> list[str]:
    """Why the cuda backend cannot run these inputs (empty when it can)."""
    reasons = []
    reason = kernels.missing_reason()
    if reason:
        reasons.append(reason)
    tensors = [x, *weights, *biases]
    if x.dtype not in _DTYPES:
        reasons.append(f"cuda chain_linear supports float32/float16/bfloat16, got {x.dtype}")
    if any(t.dtype != x.dtype for t in tensors):
        reasons.append(
            "cuda chain_linear needs one dtype for x, weights and biases, got "
            f"{sorted({str(t.dtype) for t in tensors})}"
        )
    if len({t.device for t in tensors}) > 1:
        reasons.append(
            f"cuda chain_linear needs every tensor on one device, got {sorted({str(t.device) for t in tensors})}"
        )
    if row_chains is not None:
        reasons.append(SEQ_CHAINS_DECLINED)
    return reasons
