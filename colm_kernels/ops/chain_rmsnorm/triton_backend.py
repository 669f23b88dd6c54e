"""``chain_rmsnorm``'s ``triton`` backend: the kernels of ``triton_kernels`` as custom ops.

- ``chain_rmsnorm_triton_fwd(x, weight, offsets, eps) -> (y, rstd)``: ``rstd`` (per row and
  chain, float32) is an auxiliary, non-differentiable output saved for the backward, which never
  recomputes the statistics.
- ``chain_rmsnorm_triton_bwd(dy, x, weight, rstd, offsets, needs_x, needs_weight) -> (dx, dweight)``:
  a gradient not asked for comes back as an empty ``(0,)`` tensor and costs no work (a frozen
  gain launches no dweight reduction).

``chain_rmsnorm_triton(x, weight, offsets, eps)`` is what the backend registry calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_kernels as kernels
from .api import save_for_backward


@torch.library.custom_op("colm_kernels::chain_rmsnorm_triton_fwd", mutates_args=())
def chain_rmsnorm_triton_fwd(x: Tensor, weight: Tensor, offsets: list[int], eps: float,
                             row_chains: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return kernels.chain_rmsnorm_fwd(x, weight, offsets, eps, row_chains)


@chain_rmsnorm_triton_fwd.register_fake
def _(x, weight, offsets, eps, row_chains):
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in kernels.fwd_shapes(x, offsets))


@torch.library.custom_op("colm_kernels::chain_rmsnorm_triton_bwd", mutates_args=())
def chain_rmsnorm_triton_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offsets: list[int],
                             needs_x: bool, needs_weight: bool,
                             row_chains: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return kernels.chain_rmsnorm_bwd(dy, x, weight, rstd, offsets, needs_x, needs_weight, row_chains)


@chain_rmsnorm_triton_bwd.register_fake
def _(dy, x, weight, rstd, offsets, needs_x, needs_weight, row_chains):
    return tuple(x.new_empty(shape, dtype=dtype)
                 for shape, dtype in kernels.bwd_shapes(x, weight, needs_x, needs_weight))


def _backward(ctx, dy, _drstd):
    x, weight, rstd, row_chains = ctx.saved_tensors
    needs_x, needs_weight = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if not (needs_x or needs_weight):
        return None, None, None, None, None
    dx, dweight = chain_rmsnorm_triton_bwd(dy, x, weight, rstd, ctx.offsets, needs_x, needs_weight, row_chains)
    return (dx if needs_x else None), (dweight if needs_weight else None), None, None, None


chain_rmsnorm_triton_fwd.register_autograd(_backward, setup_context=save_for_backward)


def chain_rmsnorm_triton(x: Tensor, weight: Tensor, offsets: list[int], eps: float,
                         row_chains: Optional[Tensor]) -> Tensor:
    """Per-chain RMSNorm of ``x (M, W)`` on the Triton kernels (``y`` only)."""
    return chain_rmsnorm_triton_fwd(x, weight, offsets, eps, row_chains)[0]


def not_supported_reasons(x: Tensor, weight: Tensor, offsets: list[int], eps: float,
                          row_chains=None) -> list[str]:
    """Why the Triton kernels cannot run these inputs (empty when they can). The kernels use no
    ``tl.dot``, so every float dtype runs, in the interpreter too; any number of chains."""
    reasons = []
    if x.dim() != 2:
        reasons.append(f"triton chain_rmsnorm takes x as (M, W), got shape {tuple(x.shape)}")
    if offsets and int(offsets[-1]) >= 2**31:
        reasons.append(f"triton chain_rmsnorm keeps column offsets in int32, got width {offsets[-1]}")
    return reasons
