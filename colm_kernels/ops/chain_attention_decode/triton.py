"""``chain_attention_decode``'s ``triton`` backend: the split-K kernels of ``triton_kernels``.

Op (namespace ``colm_kernels``): ``chain_attention_decode_triton(q, k_cache, v_cache,
cache_seqlens, int[] kv_head_index, int[] head_chain, Tensor? seq_chains, float softmax_scale)
-> Tensor``, a custom op (opaque to ``torch.compile``) with a fake. Forward only: it has no
autograd formula (the public function refuses inputs that require grad).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._triton.utils import attention_input_reasons
from . import triton_kernels as kernels


@torch.library.custom_op("colm_kernels::chain_attention_decode_triton", mutates_args=())
def chain_attention_decode_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, kv_head_index: list[int],
    head_chain: list[int], seq_chains: Optional[Tensor], softmax_scale: float,
) -> Tensor:
    return kernels.chain_attention_decode_fwd(q, k_cache, v_cache, cache_seqlens, kv_head_index,
                                              head_chain, seq_chains, softmax_scale)


@chain_attention_decode_triton.register_fake
def _(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains, softmax_scale):
    return q.new_empty(q.shape)


def not_supported_reasons(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains,
                          softmax_scale) -> list[str]:
    """Why the Triton kernels cannot run these inputs (device availability is checked elsewhere)."""
    reasons = attention_input_reasons("chain_attention_decode", q, kernels.MIN_HEAD_DIM, kernels.MAX_HEAD_DIM)
    reasons += kernels.layout_reasons(int(q.shape[2]), int(k_cache.shape[2]), kv_head_index, head_chain)
    return reasons
