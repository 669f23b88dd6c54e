"""``chain_linear``'s ``cuda`` backend: the cuBLAS launchers of ``cuda_kernels`` as custom ops.

Three ops, each opaque to ``torch.compile``: ``chain_linear_cuda`` (forward),
``chain_linear_cuda_bwd_dx`` and ``chain_linear_cuda_bwd_dw``. The backward launches only what
autograd needs: no input gradient when ``x`` needs none, no weight-gradient GEMMs for frozen chains
(``requires_grad=False`` blocks: chain tuning).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import cuda_kernels as kernels
from .reference import chain_linear_out_shape

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("colm_kernels::chain_linear_cuda", mutates_args=())
def chain_linear_cuda(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    return kernels.chain_linear_fwd(x, weights, biases)


@chain_linear_cuda.register_fake
def _(x, weights, biases):
    return x.new_empty(chain_linear_out_shape(x, weights))


@torch.library.custom_op("colm_kernels::chain_linear_cuda_bwd_dx", mutates_args=())
def chain_linear_cuda_bwd_dx(grad: Tensor, weights: list[Tensor], in_features: int) -> Tensor:
    return kernels.chain_linear_bwd_dx(grad, weights, in_features)


@chain_linear_cuda_bwd_dx.register_fake
def _(grad, weights, in_features):
    return grad.new_empty((grad.shape[0], in_features))


@torch.library.custom_op("colm_kernels::chain_linear_cuda_bwd_dw", mutates_args=())
def chain_linear_cuda_bwd_dw(
    grad: Tensor, x: Tensor, weights: list[Tensor], needs_weight: list[bool], needs_bias: list[bool]
) -> list[Tensor]:
    """``[dW_0.., db_0..]``; a gradient that is not needed is a fresh empty tensor (no work done)."""
    dws, dbs = kernels.chain_linear_bwd_dw(grad, x, weights, needs_weight, needs_bias)
    return [*dws, *dbs]


@chain_linear_cuda_bwd_dw.register_fake
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
    dx = chain_linear_cuda_bwd_dx(grad, weights, x.shape[1]) if needs_x else None
    dws, dbs = [None] * ctx.n_chains, [None] * ctx.n_chains
    if any(needs_w) or any(needs_b):
        flat = chain_linear_cuda_bwd_dw(grad, x, weights, needs_w, needs_b)
        dws = [g if n else None for g, n in zip(flat[: ctx.n_chains], needs_w)]
        dbs = [g if n else None for g, n in zip(flat[ctx.n_chains:], needs_b)]
    return dx, dws, dbs if ctx.has_bias else []


chain_linear_cuda.register_autograd(_backward, setup_context=_setup_context)


def not_supported_reasons(x: Tensor, weights, biases) -> list[str]:
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
    return reasons
