"""``chain_attention_decode``'s ``cuda`` backend: the kernels of ``csrc/chain_attention_decode``.

Op (namespace ``colm_kernels``): ``chain_attention_decode_cuda`` with the reference op's schema
``(q, k_cache, v_cache, cache_seqlens, int[] kv_head_index, int[] head_chain, Tensor? seq_chains,
float softmax_scale, Tensor? block_table=None) -> Tensor``, a custom op with a fake. Forward only
(no autograd formula).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _cuda
from ..chain_attention.heads import group_counts
from . import cuda_kernels as kernels
from .limits import dtype_reasons, head_dim_reasons

_FUNCTIONS = ("chain_attention_decode", ("chain_attention_decode_fwd",))
# Resolved at import (backends.preload_available), never first inside a torch.compile trace.
_cuda.functions_unavailable_reason(*_FUNCTIONS)


@torch.library.custom_op("colm_kernels::chain_attention_decode_cuda", mutates_args=())
def chain_attention_decode_cuda(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, kv_head_index: list[int],
    head_chain: list[int], seq_chains: Optional[Tensor], softmax_scale: float,
    block_table: Optional[Tensor] = None,
) -> Tensor:
    return kernels.chain_attention_decode_fwd(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain,
                                              seq_chains, softmax_scale, block_table)


chain_attention_decode_cuda.register_fake(kernels.chain_attention_decode_fake)


def not_supported_reasons(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains,
                          softmax_scale, block_table=None) -> list[str]:
    """Why the CUDA kernels cannot run these inputs (device availability is checked elsewhere)."""
    reason = _cuda.functions_unavailable_reason(*_FUNCTIONS)
    if reason:
        return [reason]
    reasons = dtype_reasons("cuda", q.dtype)
    if reasons:
        return reasons
    reasons += head_dim_reasons("cuda", int(q.shape[-1]))
    counts = group_counts(kv_head_index)
    if len(set(counts)) != 1:
        reasons.append(f"every kv head must serve the same number of query heads, got counts {counts}")
    reasons += kernels.alignment_reasons(k_cache, v_cache)
    return reasons
