"""``chain_linear``'s ``triton`` backend: the kernels of ``triton_kernels`` as custom ops.

Three ops, each opaque to ``torch.compile``: ``chain_linear_triton`` (forward),
``chain_linear_triton_bwd_dx`` and ``chain_linear_triton_bwd_dw``. The backward launches only what
autograd needs: no input gradient when ``x`` needs none, no weight-gradient tiles for frozen
chains (``requires_grad=False`` blocks: chain tuning).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._triton.utils import is_interpreter
from . import triton_kernels as kernels
from .reference import chain_linear_out_shape


@torch.library.custom_op("colm_kernels::chain_linear_triton", mutates_args=())
def chain_linear_triton(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    return kernels.chain_linear_fwd(x, weights, biases)


@chain_linear_triton.register_fake
def _(x, weights, biases):
    return x.new_empty(chain_linear_out_shape(x, weights))


@torch.library.custom_op("colm_kernels::chain_linear_triton_bwd_dx", mutates_args=())
def chain_linear_triton_bwd_dx(grad: Tensor, weights: list[Tensor], in_features: int) -> Tensor:
    return kernels.chain_linear_bwd_dx(grad, weights, in_features)


@chain_linear_triton_bwd_dx.register_fake
def _(grad, weights, in_features):
    return grad.new_empty((grad.shape[0], in_features))


@torch.library.custom_op("colm_kernels::chain_linear_triton_bwd_dw", mutates_args=())
def chain_linear_triton_bwd_dw(
    grad: Tensor, x: Tensor, weights: list[Tensor], needs_weight: list[bool], needs_bias: list[bool]
) -> list[Tensor]:
    """``[dW_0.., db_0..]``; a gradient that is not needed is an empty tensor (no work done)."""
    dws, dbs = kernels.chain_linear_bwd_dw(grad, x, weights, needs_weight, needs_bias)
    # Outputs of a custom op may not alias each other: one fresh empty tensor per gap.
    return [grad.new_empty(0) if g is None else g for g in (*dws, *dbs)]


@chain_linear_triton_bwd_dw.register_fake
def _(grad, x, weights, needs_weight, needs_bias):
    dws = [grad.new_empty(w.shape) if n else grad.new_empty(0) for w, n in zip(weights, needs_weight)]
    dbs = [grad.new_empty(w.shape[0]) if n else grad.new_empty(0) for w, n in zip(weights, needs_bias)]
    return dws + dbs


def _setup_context(ctx, inputs, output):
    x, weights, biases = inputs
    ctx.save_for_backward(x, *weights)
    ctx.n_chains = len(weights)
    ctx.has_bias = bool(biases)


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad
    needs_w = [bool(n) for n in needs_w]
    needs_b = [bool(n) for n in needs_b] if ctx.has_bias else [False] * ctx.n_chains
    # A zero-token gradient may arrive with zero strides: give the kernels a fresh layout.
    grad = grad.contiguous() if grad.numel() else torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    dx = chain_linear_triton_bwd_dx(grad, weights, x.shape[1]) if needs_x else None
    dws, dbs = [None] * ctx.n_chains, [None] * ctx.n_chains
    if any(needs_w) or any(needs_b):
        flat = chain_linear_triton_bwd_dw(grad, x, weights, needs_w, needs_b)
        dws = [g if n else None for g, n in zip(flat[: ctx.n_chains], needs_w)]
        dbs = [g if n else None for g, n in zip(flat[ctx.n_chains:], needs_b)]
    return dx, dws, dbs if ctx.has_bias else []


chain_linear_triton.register_autograd(_backward, setup_context=_setup_context)


def not_supported_reasons(x: Tensor, weights, biases) -> list[str]:
    if is_interpreter() and x.dtype == torch.bfloat16:
        return ["the Triton interpreter computes bfloat16 tl.dot wrongly: bfloat16 needs a GPU"]
    return []
