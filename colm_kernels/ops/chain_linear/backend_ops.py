"""The three custom ops of a ``chain_linear`` kernel backend, made from its launchers.

``define_backend_ops("triton", kernels)`` registers ``colm_kernels::chain_linear_triton``
(forward, with fake and autograd), ``..._bwd_dx`` and ``..._bwd_dw``, each opaque to
``torch.compile``. The backward launches only what autograd needs: no input gradient when ``x``
needs none, no weight-gradient work for frozen chains (``requires_grad=False`` blocks: chain
tuning). ``kernels`` is the module of launchers, looked up at each call:

    chain_linear_fwd(x, weights, biases, row_chains) -> y
    chain_linear_bwd_dx(dy, weights, in_features, row_chains) -> dx
    chain_linear_bwd_dw(dy, x, weights, needs_weight, needs_bias, row_chains) -> (dWs, dbs), None where not needed

``row_chains`` (int32, one scale per row, or None) makes a row's outputs beyond its scale exact
zeros and keeps them out of every gradient.
"""
from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .._checks import dense
from .reference import chain_linear_out_shape


def define_backend_ops(backend: str, kernels: ModuleType) -> SimpleNamespace:
    """Returns ``SimpleNamespace(forward=..., bwd_dx=..., bwd_dw=...)`` (the registered ops)."""
    name = f"colm_kernels::chain_linear_{backend}"

    @torch.library.custom_op(name, mutates_args=())
    def forward(x: Tensor, weights: list[Tensor], biases: list[Tensor],
                row_chains: Optional[Tensor]) -> Tensor:
        return kernels.chain_linear_fwd(x, weights, biases, row_chains)

    @forward.register_fake
    def _(x, weights, biases, row_chains):
        return x.new_empty(chain_linear_out_shape(x, weights))

    @torch.library.custom_op(name + "_bwd_dx", mutates_args=())
    def backward_dx(grad: Tensor, weights: list[Tensor], in_features: int,
                    row_chains: Optional[Tensor]) -> Tensor:
        return kernels.chain_linear_bwd_dx(grad, weights, in_features, row_chains)

    @backward_dx.register_fake
    def _(grad, weights, in_features, row_chains):
        return grad.new_empty((grad.shape[0], in_features))

    @torch.library.custom_op(name + "_bwd_dw", mutates_args=())
    def backward_dw(grad: Tensor, x: Tensor, weights: list[Tensor], needs_weight: list[bool],
                    needs_bias: list[bool], row_chains: Optional[Tensor]) -> list[Tensor]:
        """``[dW_0.., db_0..]``; a gradient that is not needed is an empty tensor (no work done)."""
        dws, dbs = kernels.chain_linear_bwd_dw(grad, x, weights, needs_weight, needs_bias, row_chains)
        # Outputs of a custom op may not alias each other: one fresh empty tensor per gap.
        return [grad.new_empty(0) if g is None else g for g in (*dws, *dbs)]

    @backward_dw.register_fake
    def _(grad, x, weights, needs_weight, needs_bias, row_chains):
        dws = [grad.new_empty(w.shape) if n else grad.new_empty(0) for w, n in zip(weights, needs_weight)]
        dbs = [grad.new_empty(w.shape[0]) if n else grad.new_empty(0) for w, n in zip(weights, needs_bias)]
        return dws + dbs

    def setup_context(ctx, inputs, output):
        x, weights, biases, row_chains = inputs
        ctx.save_for_backward(x, row_chains, *weights)
        ctx.n_chains = len(weights)
        ctx.has_bias = bool(biases)

    def backward(ctx, grad):
        x, row_chains, *weights = ctx.saved_tensors
        n = ctx.n_chains
        needs_x, needs_w, needs_b, _ = ctx.needs_input_grad
        needs_w = [bool(v) for v in needs_w]
        needs_b = [bool(v) for v in needs_b] if ctx.has_bias else [False] * n
        grad = dense(grad)  # a zero-token gradient may arrive with zero strides
        dx = backward_dx(grad, weights, x.shape[1], row_chains) if needs_x else None
        dws, dbs = [None] * n, [None] * n
        if any(needs_w) or any(needs_b):
            flat = backward_dw(grad, x, weights, needs_w, needs_b, row_chains)
            dws = [g if need else None for g, need in zip(flat[:n], needs_w)]
            dbs = [g if need else None for g, need in zip(flat[n:], needs_b)]
        return dx, dws, dbs if ctx.has_bias else [], None

    forward.register_autograd(backward, setup_context=setup_context)
    return SimpleNamespace(forward=forward, bwd_dx=backward_dx, bwd_dw=backward_dw)
