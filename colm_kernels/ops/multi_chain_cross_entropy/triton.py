"""``multi_chain_cross_entropy``'s ``triton`` backend: the kernels of ``triton_kernels`` as custom
ops. ``colm_kernels::multi_chain_cross_entropy_triton`` has the reference op's schema (losses per
scale, fp32) with a fake and autograd; its backward is ``..._triton_bwd`` (recomputes the per-row
logsumexp, then rebuilds logits tile by tile: no ``(N, V)`` tensor per scale in either pass)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..._triton.utils import interpreter_dtype_reasons
from . import triton_kernels as kernels

_NAME = "colm_kernels::multi_chain_cross_entropy_triton"


@torch.library.custom_op(_NAME, mutates_args=())
def multi_chain_cross_entropy_triton(hidden: Tensor, weight: Tensor, targets: Tensor,
                                     offsets: list[int], ignore_index: int) -> Tensor:
    return kernels.mcce_fwd(hidden, weight, targets, offsets, ignore_index)


@multi_chain_cross_entropy_triton.register_fake
def _(hidden, weight, targets, offsets, ignore_index):
    return hidden.new_empty(kernels.mcce_out_shape(offsets), dtype=torch.float32)


@torch.library.custom_op(_NAME + "_bwd", mutates_args=())
def multi_chain_cross_entropy_triton_bwd(
    grad: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, offsets: list[int],
    ignore_index: int, needs_hidden: bool, needs_weight: bool,
) -> list[Tensor]:
    """``[dh, dW]``; a gradient that is not needed is an empty tensor (no work done)."""
    dh, dw = kernels.mcce_bwd(grad, hidden, weight, targets, offsets, ignore_index,
                              needs_hidden, needs_weight)
    return [hidden.new_empty(0) if dh is None else dh, weight.new_empty(0) if dw is None else dw]


@multi_chain_cross_entropy_triton_bwd.register_fake
def _(grad, hidden, weight, targets, offsets, ignore_index, needs_hidden, needs_weight):
    return [hidden.new_empty(hidden.shape if needs_hidden else 0),
            weight.new_empty(weight.shape if needs_weight else 0)]


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, offsets, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, targets)
    ctx.offsets = list(offsets)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad):
    hidden, weight, targets = ctx.saved_tensors
    needs_h, needs_w = ctx.needs_input_grad[:2]
    if not (needs_h or needs_w):
        return None, None, None, None, None
    dh, dw = multi_chain_cross_entropy_triton_bwd(
        grad.contiguous(), hidden, weight, targets, ctx.offsets, ctx.ignore_index,
        bool(needs_h), bool(needs_w))
    return dh if needs_h else None, dw if needs_w else None, None, None, None


multi_chain_cross_entropy_triton.register_autograd(_backward, setup_context=_setup_context)


def not_supported_reasons(hidden: Tensor, weight: Tensor, targets: Tensor, offsets,
                          ignore_index) -> list[str]:
    reasons = interpreter_dtype_reasons(hidden.dtype)
    if max(weight.shape[0], weight.shape[1]) >= 2**31:
        reasons.append(f"vocabulary and width must be below 2**31, got weight {tuple(weight.shape)}")
    return reasons
