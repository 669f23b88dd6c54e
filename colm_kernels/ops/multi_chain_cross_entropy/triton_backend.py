"""``multi_chain_cross_entropy``'s ``triton`` backend: the kernels of ``triton_kernels`` as custom
ops. ``colm_kernels::multi_chain_cross_entropy_triton_fwd`` returns the reference op's output and
the per-row, per-scale logsumexp ``(N, NS)``, which autograd saves with the inputs (nothing else;
per-row scales ``row_chains`` are an input too);
its backward, ``..._triton_bwd``, rebuilds logits tile by tile from it (no second logsumexp pass)
and runs the gradient GEMMs in Triton. ``multi_chain_cross_entropy_triton`` (what the dispatcher
calls) has the reference op's signature and returns the output alone."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._triton.device import interpreter_dtype_reasons
from . import triton_kernels as kernels

_NAME = "colm_kernels::multi_chain_cross_entropy_triton"


@torch.library.custom_op(_NAME + "_fwd", mutates_args=())
def multi_chain_cross_entropy_triton_fwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, offsets: list[int], ignore_index: int,
    reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float,
    row_chains: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    return kernels.mcce_fwd(hidden, weight, targets, offsets, ignore_index, reduction,
                            label_smoothing, lse_square_scale, softcap, row_chains)


@multi_chain_cross_entropy_triton_fwd.register_fake
def _(hidden, weight, targets, offsets, ignore_index, reduction, label_smoothing, lse_square_scale,
      softcap, row_chains=None):
    out = hidden.new_empty(kernels.mcce_out_shape(offsets, hidden.shape[0], reduction), dtype=torch.float32)
    return out, hidden.new_empty((hidden.shape[0], len(offsets) - 1), dtype=torch.float32)


@torch.library.custom_op(_NAME + "_bwd", mutates_args=())
def multi_chain_cross_entropy_triton_bwd(
    grad: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, offsets: list[int],
    ignore_index: int, reduction: str, label_smoothing: float, lse_square_scale: float,
    softcap: float, needs_hidden: bool, needs_weight: bool, row_chains: Optional[Tensor] = None,
) -> list[Tensor]:
    """``[dh, dW]``; a gradient that is not needed is an empty tensor (no work done)."""
    dh, dw = kernels.mcce_bwd(grad, hidden, weight, targets, offsets, ignore_index, needs_hidden,
                              needs_weight, lse=lse, reduction=reduction,
                              label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                              softcap=softcap, row_chains=row_chains)
    return [hidden.new_empty(0) if dh is None else dh, weight.new_empty(0) if dw is None else dw]


@multi_chain_cross_entropy_triton_bwd.register_fake
def _(grad, hidden, weight, targets, lse, offsets, ignore_index, reduction, label_smoothing,
      lse_square_scale, softcap, needs_hidden, needs_weight, row_chains=None):
    return [hidden.new_empty(hidden.shape if needs_hidden else 0),
            weight.new_empty(weight.shape if needs_weight else 0)]


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, offsets, ignore_index, *options, row_chains = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, targets, lse, row_chains)  # no logits, no copies: O(N x NS) extra
    ctx.offsets = list(offsets)
    ctx.ignore_index = ignore_index
    ctx.options = options


def _backward(ctx, grad, _grad_lse):
    hidden, weight, targets, lse, row_chains = ctx.saved_tensors
    needs_h, needs_w = ctx.needs_input_grad[:2]
    none = (None,) * 8
    if not (needs_h or needs_w):
        return (None, None) + none
    dh, dw = multi_chain_cross_entropy_triton_bwd(
        grad.contiguous(), hidden, weight, targets, lse, ctx.offsets, ctx.ignore_index,
        *ctx.options, bool(needs_h), bool(needs_w), row_chains)
    return (dh if needs_h else None, dw if needs_w else None) + none


multi_chain_cross_entropy_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def multi_chain_cross_entropy_triton(hidden: Tensor, weight: Tensor, targets: Tensor, offsets: list[int],
                                     ignore_index: int, reduction: str = "mean",
                                     label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                                     softcap: float = 0.0, row_chains: Optional[Tensor] = None) -> Tensor:
    """The reference op's signature and output (``(2, NS)`` or ``(2, NS, N)``)."""
    out, _ = multi_chain_cross_entropy_triton_fwd(hidden, weight, targets, offsets, ignore_index,
                                                  reduction, label_smoothing, lse_square_scale, softcap,
                                                  row_chains)
    return out


def not_supported_reasons(hidden: Tensor, weight: Tensor, targets: Tensor, offsets, ignore_index,
                          **options) -> list[str]:
    reasons = interpreter_dtype_reasons(hidden.dtype)
    if max(weight.shape[0], weight.shape[1]) >= 2**31:
        reasons.append(f"vocabulary and width must be below 2**31, got weight {tuple(weight.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:  # the API copies such inputs; a direct call may not
            reasons.append(f"{name} must have a unit-stride last dim, got strides {tuple(t.stride())}")
    return reasons
