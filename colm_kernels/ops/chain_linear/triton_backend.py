"""``chain_linear``'s ``triton`` backend: the launchers of ``triton_launch`` as custom ops
(``chain_linear_triton``, ``..._bwd_dx``, ``..._bwd_dw``; see ``backend_ops``)."""
from __future__ import annotations

from torch import Tensor

from ..._triton.device import interpreter_dtype_reasons
from . import triton_launch as launch
from .backend_ops import define_backend_ops

_ops = define_backend_ops("triton", launch)
chain_linear_triton = _ops.forward
chain_linear_triton_bwd_dx = _ops.bwd_dx
chain_linear_triton_bwd_dw = _ops.bwd_dw


def not_supported_reasons(x: Tensor, weights, biases, row_chains=None) -> list[str]:
    return interpreter_dtype_reasons(x.dtype)
