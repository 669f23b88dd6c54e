"""``chain_swiglu``'s ``triton`` backend: the kernels of ``triton_kernels`` as custom ops.

- ``chain_swiglu_triton_fwd(x, w1, w3, save_gates) -> (h, gates)``: the fused dual-GEMM forward;
  ``gates`` (``[a_1 | b_1 | ...]``, what the backward needs) is written by the same epilogue only
  when ``save_gates``, else it is empty. ``gates`` is an auxiliary, non-differentiable output.
- ``chain_swiglu_triton_bwd_gates(grad, gates, widths) -> dgates``: the elementwise
  ``(da, db)`` of silu(a) * b, in the same interleaved layout.
- dx and dW1/dW3 are the registered chain-linear backward ops (``chain_linear_triton_bwd_dx`` /
  ``_bwd_dw``) over the interleaved weights ``[W1_1, W3_1, ...]``: dx = da W1 + db W3 in one
  kernel, both weight gradients in one launch, no tiles for frozen blocks.

``chain_swiglu_triton(x, w1, w3)`` is what the backend registry calls: it asks for the gates only
when autograd will need them (grad mode on and some input requires grad).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._triton.device import interpreter_dtype_reasons
from .._checks import dense
from ..chain_linear.triton_backend import chain_linear_triton_bwd_dw, chain_linear_triton_bwd_dx
from . import triton_kernels as kernels
from .reference import chain_swiglu_out_shape


@torch.library.custom_op("colm_kernels::chain_swiglu_triton_fwd", mutates_args=())
def chain_swiglu_triton_fwd(x: Tensor, w1: list[Tensor], w3: list[Tensor],
                            save_gates: bool, row_chains: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return kernels.chain_swiglu_fwd(x, w1, w3, save_gates, row_chains)


@chain_swiglu_triton_fwd.register_fake
def _(x, w1, w3, save_gates, row_chains):
    gates = x.new_empty(kernels.gates_shape(x, w1) if save_gates else (0,))
    return x.new_empty(chain_swiglu_out_shape(x, w1)), gates


@torch.library.custom_op("colm_kernels::chain_swiglu_triton_bwd_gates", mutates_args=())
def chain_swiglu_triton_bwd_gates(grad: Tensor, gates: Tensor, widths: list[int]) -> Tensor:
    return kernels.chain_swiglu_bwd_gates(grad, gates, widths)


@chain_swiglu_triton_bwd_gates.register_fake
def _(grad, gates, widths):
    return grad.new_empty(gates.shape)


def _setup_context(ctx, inputs, output):
    x, w1, w3, save_gates, row_chains = inputs
    _, gates = output
    ctx.mark_non_differentiable(gates)
    ctx.set_materialize_grads(False)  # no (M, 2N) zeros for the gates' (absent) gradient
    ctx.n_chains = len(w1)
    ctx.widths = [int(w.shape[0]) for w in w1]
    ctx.has_gates = bool(save_gates)
    if save_gates:
        ctx.save_for_backward(x, gates, row_chains, *w1, *w3)


def _backward(ctx, grad, _grad_gates):
    if not ctx.has_gates:
        raise RuntimeError(
            "chain_swiglu_triton_fwd ran with save_gates=False, so it kept no gates for the "
            "backward; call it with save_gates=True when a gradient is needed"
        )
    if grad is None:  # h does not reach the loss (only possible with materialize_grads off)
        return None, [None] * ctx.n_chains, [None] * ctx.n_chains, None, None
    x, gates, row_chains, *ws = ctx.saved_tensors
    n = ctx.n_chains
    w1, w3 = ws[:n], ws[n:]
    needs_x, needs_w1, needs_w3, _, _ = ctx.needs_input_grad
    grad = dense(grad)  # an empty grad may come expanded (strides 0)
    # the gates are zero beyond each row's scale, so their gradient is too; the chain-linear
    # backward skips those rows' work. Blocks 2i, 2i + 1 of the interleaved list belong to chain i:
    # a row of scale s reaches block b iff b <= 2s + 1.
    dgates = chain_swiglu_triton_bwd_gates(grad, gates, ctx.widths)
    pair = kernels.interleave(w1, w3)
    pair_rows = None if row_chains is None else row_chains * 2 + 1
    dx = chain_linear_triton_bwd_dx(dgates, pair, x.shape[1], pair_rows) if needs_x else None
    flags = [bool(f) for f in kernels.interleave(needs_w1, needs_w3)]
    dws = [None] * (2 * n)
    if any(flags):
        flat = chain_linear_triton_bwd_dw(dgates, x, pair, flags, [False] * (2 * n), pair_rows)
        dws = [g if f else None for g, f in zip(flat[: 2 * n], flags)]
    return dx, dws[0::2], dws[1::2], None, None


chain_swiglu_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def chain_swiglu_triton(x: Tensor, w1: list[Tensor], w3: list[Tensor],
                        row_chains: Optional[Tensor]) -> Tensor:
    """``silu(x W1^T) * x W3^T`` on the fused kernel; gates are stored only if autograd needs them."""
    save = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in (*w1, *w3)))
    h, _ = chain_swiglu_triton_fwd(x, w1, w3, save, row_chains)
    return h


def not_supported_reasons(x: Tensor, w1, w3, row_chains=None) -> list[str]:
    return interpreter_dtype_reasons(x.dtype)
