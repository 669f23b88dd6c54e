"""``chain_rmsnorm``'s ``cuda`` backend: the kernels of ``csrc/chain_rmsnorm`` as custom ops.

The forward op returns ``(y, rstd)``; ``rstd`` (per row and chain, float32) is saved for the
backward, which never recomputes the statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _cuda
from . import cuda_kernels as kernels
from .api import save_for_backward

_FUNCTIONS = ("chain_rmsnorm", ("chain_rmsnorm_fwd", "chain_rmsnorm_bwd"))
SEQ_CHAINS_DECLINED = ("cuda chain_rmsnorm does not take seq_chains: its kernels would normalise every "
                       "segment and zero the rest; the triton kernels skip the inactive rows' segments")
# Resolved at import (backends.preload_available), never first inside a torch.compile trace.
_cuda.functions_unavailable_reason(*_FUNCTIONS)


# Per-row scales are declined (``not_supported_reasons``): the kernels could only normalise every
# segment and zero the rest, where the Triton kernels skip the inactive rows' segments. The op keeps
# ``row_chains`` in its signature (shared with the Triton op's autograd setup); it is always None.
@torch.library.custom_op("colm_kernels::chain_rmsnorm_cuda_fwd", mutates_args=())
def chain_rmsnorm_cuda_fwd(x: Tensor, weight: Tensor, offsets: list[int], eps: float,
                           row_chains: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if row_chains is not None:
        raise ValueError(SEQ_CHAINS_DECLINED)
    return kernels.chain_rmsnorm_fwd(x, weight, offsets, eps)


@chain_rmsnorm_cuda_fwd.register_fake
def _(x, weight, offsets, eps, row_chains):
    return kernels.chain_rmsnorm_fwd_fake(x, weight, offsets, eps)


@torch.library.custom_op("colm_kernels::chain_rmsnorm_cuda_bwd", mutates_args=())
def chain_rmsnorm_cuda_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                           offsets: list[int], needs_weight: bool) -> tuple[Tensor, Tensor]:
    return kernels.chain_rmsnorm_bwd(dy, x, weight, rstd, offsets, needs_weight)


chain_rmsnorm_cuda_bwd.register_fake(kernels.chain_rmsnorm_bwd_fake)


def _backward(ctx, dy, _drstd):
    x, weight, rstd, _row_chains = ctx.saved_tensors
    needs_x, needs_weight = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if not (needs_x or needs_weight):
        return None, None, None, None, None
    # A frozen gain launches no dweight work (as the Triton backend).
    dx, dweight = chain_rmsnorm_cuda_bwd(dy.contiguous(), x, weight, rstd, ctx.offsets, needs_weight)
    return (dx if needs_x else None), (dweight if needs_weight else None), None, None, None


chain_rmsnorm_cuda_fwd.register_autograd(_backward, setup_context=save_for_backward)


def chain_rmsnorm_cuda(x: Tensor, weight: Tensor, offsets: list[int], eps: float,
                       row_chains: Optional[Tensor]) -> Tensor:
    return chain_rmsnorm_cuda_fwd(x, weight, offsets, eps, row_chains)[0]


def not_supported_reasons(x: Tensor, weight: Tensor, offsets: list[int], eps: float,
                          row_chains=None) -> list[str]:
    """Why the CUDA kernels cannot run these inputs (empty when they can)."""
    reasons = []
    reason = _cuda.functions_unavailable_reason(*_FUNCTIONS)
    if reason:
        reasons.append(reason)
    if len(offsets) - 1 > kernels.MAX_CHAINS:
        reasons.append(f"cuda chain_rmsnorm handles at most {kernels.MAX_CHAINS} chains, got {len(offsets) - 1}")
    if row_chains is not None:
        reasons.append(SEQ_CHAINS_DECLINED)
    return reasons
