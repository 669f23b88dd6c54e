"""``chain_attention``'s ``triton`` backend: the FlashAttention-2 kernels of ``triton_kernels``.

Ops (namespace ``colm_kernels``); the trailing ``cu_seqlens_q``, ``cu_seqlens_k`` (``Tensor?``,
default None) and ``max_seqlen_q``, ``max_seqlen_k`` (``int``, default 0) carry variable-length
packed batches (flash-attn convention; None: the padded ``(B, S, H, D)`` layout), and
``deterministic`` (``bool``, default False) picks the backward (``triton_launch.chain_attention_bwd``):
dQ by fp32 atomics in the one pass over key blocks (fast; the summation order varies run to run),
or a separate dQ pass (one more QK^T and dP recompute; bitwise reproducible):
- ``chain_attention_triton_fwd(q, k, v, kv_head_index, head_chain, causal, seq_chains,
  softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)
  -> (out, lse)``: custom op
  (opaque to ``torch.compile``) with a fake and autograd; ``lse`` (fp32 ``(B, Hq, Sq)``, varlen
  ``(Hq, total_q)``) is saved for the backward and is not differentiable; ``deterministic`` only
  reaches the backward.
- ``chain_attention_triton_bwd(dout, q, k, v, out, lse, ..., need_dq, need_dkv, cu_seqlens_q, ...,
  deterministic) -> (dq, dk, dv)``: custom op with a fake (delta preprocess, then the key-block pass
  reducing each kv head's query heads' dK/dV in-kernel, with dQ by atomics or by its own pass);
  only what autograd needs runs (e.g. no dK/dV for frozen shared KV).
- ``chain_attention_triton``: the reference op's schema ``(q, k, v, int[] kv_head_index,
  int[] head_chain, bool causal, Tensor? seq_chains, float softmax_scale, Tensor? cu_seqlens_q=None,
  Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, bool deterministic=False)
  -> Tensor``, registered
  CompositeImplicitAutograd as ``chain_attention_triton_fwd(...)[0]``, so autograd (and the
  compiler) go through the forward op and the logsumexp it returns is never recomputed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._triton.device import attention_input_reasons
from . import triton_launch as launch
from .heads import layout_reasons
from .triton_tiles import MAX_HEAD_DIM, MIN_HEAD_DIM, head_dim_reasons

_NS = "colm_kernels"


@torch.library.custom_op(f"{_NS}::chain_attention_triton_fwd", mutates_args=())
def chain_attention_triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, kv_head_index: list[int], head_chain: list[int], causal: bool,
    seq_chains: Optional[Tensor], softmax_scale: float,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    return launch.chain_attention_fwd(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale,
                                       cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@chain_attention_triton_fwd.register_fake
def _(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale,
      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, deterministic=False):
    out_shape, lse_shape = launch.fwd_out_shapes(q, cu_seqlens_q is not None)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::chain_attention_triton_bwd", mutates_args=())
def chain_attention_triton_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    kv_head_index: list[int], head_chain: list[int], causal: bool,
    seq_chains: Optional[Tensor], softmax_scale: float, need_dq: bool, need_dkv: bool,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``; a gradient that is not needed is an empty tensor (its kernel never runs)."""
    dq, dk, dv = launch.chain_attention_bwd(dout, q, k, v, out, lse, kv_head_index, head_chain, causal,
                                             seq_chains, softmax_scale, need_dq, need_dkv,
                                             cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             deterministic)
    # Outputs of a custom op may not alias each other: one fresh empty tensor per gap.
    return tuple(ref.new_empty(0) if g is None else g for g, ref in ((dq, q), (dk, k), (dv, v)))


@chain_attention_triton_bwd.register_fake
def _(dout, q, k, v, out, lse, kv_head_index, head_chain, causal, seq_chains, softmax_scale, need_dq, need_dkv,
      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, deterministic=False):
    return (q.new_empty(q.shape if need_dq else 0), k.new_empty(k.shape if need_dkv else 0),
            v.new_empty(v.shape if need_dkv else 0))


_N_FWD_ARGS = 13  # inputs of chain_attention_triton_fwd


def _setup_context(ctx, inputs, output):
    (q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale,
     cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, seq_chains, cu_seqlens_q, cu_seqlens_k)
    ctx.args = (list(kv_head_index), list(head_chain), bool(causal), float(softmax_scale))
    ctx.max_seqlens = (int(max_seqlen_q), int(max_seqlen_k))
    ctx.deterministic = bool(deterministic)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, seq_chains, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    kv_head_index, head_chain, causal, softmax_scale = ctx.args
    if dout is None:
        return (None,) * _N_FWD_ARGS
    needs = ctx.needs_input_grad
    need_dq, need_dkv = bool(needs[0]), bool(needs[1] or needs[2])
    dq, dk, dv = chain_attention_triton_bwd(dout, q, k, v, out, lse, kv_head_index, head_chain, causal,
                                            seq_chains, softmax_scale, need_dq, need_dkv,
                                            cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, ctx.deterministic)
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None) + \
        (None,) * (_N_FWD_ARGS - 3)


chain_attention_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


torch.library.define(
    f"{_NS}::chain_attention_triton",
    "(Tensor q, Tensor k, Tensor v, int[] kv_head_index, int[] head_chain, bool causal, "
    "Tensor? seq_chains, float softmax_scale, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
    "int max_seqlen_q=0, int max_seqlen_k=0, bool deterministic=False) -> Tensor",
)


@torch.library.impl(f"{_NS}::chain_attention_triton", "CompositeImplicitAutograd")
def _chain_attention_triton(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale,
                            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                            deterministic=False):
    return chain_attention_triton_fwd(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale,
                                      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)[0]


chain_attention_triton = torch.ops.colm_kernels.chain_attention_triton.default


def not_supported_reasons(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale,
                          cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                          deterministic=False) -> list[str]:
    """Why the Triton kernels cannot run these inputs (device availability is checked elsewhere)."""
    reasons = attention_input_reasons("chain_attention", q, MIN_HEAD_DIM, MAX_HEAD_DIM,
                                      head_dim_reasons=head_dim_reasons)
    reasons += layout_reasons(int(q.shape[-2]), int(k.shape[-2]), kv_head_index, head_chain)
    return reasons
