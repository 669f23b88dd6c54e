"""``multi_chain_cross_entropy``'s ``triton`` backend: the kernels of ``triton_kernels`` as custom
ops. ``colm_kernels::multi_chain_cross_entropy_triton_fwd`` returns the reference op's output and
the per-row, per-scale logsumexp ``(N, NS)``, which autograd saves with the inputs (nothing else;
per-row scales ``row_chains`` are an input too);
its backward, ``..._triton_bwd``, rebuilds logits tile by tile from it (no second logsumexp pass)
and runs the gradient GEMMs in Triton. ``multi_chain_cross_entropy_triton`` (what the dispatcher
calls) has the reference op's signature and returns the output alone. With ``weights`` and a
gradient to compute it calls ``..._triton_fused`` instead (``triton_fused``: the gradients in the
forward, 3 GEMMs), which autograd saves as fp32 ``dh`` and ``dW`` and scales in the backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._triton.device import interpreter_dtype_reasons
from . import triton_fused as fused
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


@torch.library.custom_op(_NAME + "_fused", mutates_args=())
def multi_chain_cross_entropy_triton_fused(
    hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, offsets: list[int], ignore_index: int,
    reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float,
    row_chains: Optional[Tensor], needs_hidden: bool, needs_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out (2,), dh, dW)``: the weighted totals and the fp32 gradients of ``out[0]`` computed
    with them (``triton_fused``: 3 GEMMs); a gradient that is not needed is an empty tensor."""
    out, dh, dw = fused.mcce_fused(hidden, weight, targets, weights, offsets, ignore_index, reduction,
                                   label_smoothing, lse_square_scale, softcap, row_chains,
                                   needs_hidden, needs_weight)
    f32 = torch.float32
    return (out, hidden.new_empty(0, dtype=f32) if dh is None else dh,
            weight.new_empty(0, dtype=f32) if dw is None else dw)


@multi_chain_cross_entropy_triton_fused.register_fake
def _(hidden, weight, targets, weights, offsets, ignore_index, reduction, label_smoothing, lse_square_scale,
      softcap, row_chains, needs_hidden, needs_weight):
    f32 = torch.float32
    return (hidden.new_empty((2,), dtype=f32), hidden.new_empty(hidden.shape if needs_hidden else 0, dtype=f32),
            weight.new_empty(weight.shape if needs_weight else 0, dtype=f32))


def _fused_setup_context(ctx, inputs, output):
    _, dh, dw = output
    ctx.mark_non_differentiable(dh, dw)
    ctx.save_for_backward(dh, dw)  # the gradients themselves: nothing else is kept
    ctx.needs = inputs[-2:]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _fused_backward(ctx, grad, _grad_dh, _grad_dw):
    # Only out[0] (the weighted loss) carries a gradient on this path: the API sends calls that
    # return the z-loss to the per-scale path. Out of place, so a retained graph can run it again.
    dh, dw = ctx.saved_tensors
    g = grad[0]
    needs_h, needs_w = ctx.needs
    dtypes = ctx.dtypes
    return (((dh * g).to(dtypes[0]) if needs_h else None, (dw * g).to(dtypes[1]) if needs_w else None)
            + (None,) * 11)


multi_chain_cross_entropy_triton_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def multi_chain_cross_entropy_triton(hidden: Tensor, weight: Tensor, targets: Tensor, offsets: list[int],
                                     ignore_index: int, reduction: str = "mean",
                                     label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                                     softcap: float = 0.0, row_chains: Optional[Tensor] = None,
                                     weights: Optional[Tensor] = None) -> Tensor:
    """The reference op's signature and output (``(2, NS)``, ``(2, NS, N)``, or ``(2,)`` with
    ``weights``). With ``weights`` and a gradient to compute (not for ``weights`` itself) the
    fused path runs (gradients in the forward, 3 GEMMs); otherwise the per-scale op, weighted."""
    options = (reduction, label_smoothing, lse_square_scale, softcap)
    if weights is not None:
        needs_h, needs_w = (torch.is_grad_enabled() and t.requires_grad for t in (hidden, weight))
        if (needs_h or needs_w) and not weights.requires_grad:
            out, _, _ = multi_chain_cross_entropy_triton_fused(
                hidden, weight, targets, weights, offsets, ignore_index, *options, row_chains,
                bool(needs_h), bool(needs_w))
            return out
    out, _ = multi_chain_cross_entropy_triton_fwd(hidden, weight, targets, offsets, ignore_index, *options,
                                                  row_chains)
    return out if weights is None else (out * weights.to(out.dtype)).sum(-1)


def not_supported_reasons(hidden: Tensor, weight: Tensor, targets: Tensor, offsets, ignore_index,
                          **options) -> list[str]:
    reasons = interpreter_dtype_reasons(hidden.dtype)
    if max(weight.shape[0], weight.shape[1]) >= 2**31:
        reasons.append(f"vocabulary and width must be below 2**31, got weight {tuple(weight.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:  # the API copies such inputs; a direct call may not
            reasons.append(f"{name} must have a unit-stride last dim, got strides {tuple(t.stride())}")
    return reasons
