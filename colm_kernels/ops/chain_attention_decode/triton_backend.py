"""``chain_attention_decode``'s ``triton`` backend: the split-K kernels of ``triton_kernels``.

Op (namespace ``colm_kernels``): ``chain_attention_decode_triton(q, k_cache, v_cache,
cache_seqlens, int[] kv_head_index, int[] head_chain, Tensor? seq_chains, float softmax_scale,
Tensor? block_table=None) -> Tensor``, a custom op (opaque to ``torch.compile``) with a fake.
Forward only: it has no autograd formula (the public function refuses inputs that require grad).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._triton.device import interpreter_dtype_reasons
from . import triton_kernels as kernels
from .limits import dtype_reasons, head_dim_reasons


@torch.library.custom_op("colm_kernels::chain_attention_decode_triton", mutates_args=())
def chain_attention_decode_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, kv_head_index: list[int],
    head_chain: list[int], seq_chains: Optional[Tensor], softmax_scale: float,
    block_table: Optional[Tensor] = None,
) -> Tensor:
    return kernels.chain_attention_decode_fwd(q, k_cache, v_cache, cache_seqlens, kv_head_index,
                                              head_chain, seq_chains, softmax_scale, block_table)


@chain_attention_decode_triton.register_fake
def _(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains, softmax_scale, block_table=None):
    return q.new_empty(q.shape)


def not_supported_reasons(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains,
                          softmax_scale, block_table=None) -> list[str]:
    """Why the Triton kernels cannot run these inputs (device availability is checked elsewhere)."""
    reasons = dtype_reasons("triton", q.dtype) + interpreter_dtype_reasons(q.dtype)
    reasons += head_dim_reasons("triton", int(q.shape[-1]))
    reasons += kernels.layout_reasons(int(q.shape[2]), int(k_cache.shape[2]), kv_head_index, head_chain)
    return reasons
