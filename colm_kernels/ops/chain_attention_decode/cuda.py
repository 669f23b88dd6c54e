"""``chain_attention_decode``'s ``cuda`` backend: the kernels of ``csrc/chain_attention_decode``.

Op (namespace ``colm_kernels``): ``chain_attention_decode_cuda`` with the reference op's schema
``(q, k_cache, v_cache, cache_seqlens, int[] kv_head_index, int[] head_chain, Tensor? seq_chains,
float softmax_scale) -> Tensor``, a custom op with a fake. Forward only (no autograd formula).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _cuda
from ..chain_attention.heads import group_counts
from . import cuda_kernels as kernels

_FUNCTIONS = ("chain_attention_decode", ("chain_attention_decode_fwd",))
# Resolved at import (backends.preload_available), never first inside a torch.compile trace.
_cuda.functions_unavailable_reason(*_FUNCTIONS)


@torch.library.custom_op("colm_kernels::chain_attention_decode_cuda", mutates_args=())
def chain_attention_decode_cuda(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, kv_head_index: list[int],
    head_chain: list[int], seq_chains: Optional[Tensor], softmax_scale: float,
) -> Tensor:
    return kernels.chain_attention_decode_fwd(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain,
                                              seq_chains, softmax_scale)


chain_attention_decode_cuda.register_fake(kernels.chain_attention_decode_fake)


def not_supported_reasons(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains,
                          softmax_scale) -> list[str]:
    """Why the CUDA kernels cannot run these inputs (device availability is checked elsewhere)."""
    reasons = []
    reason = _cuda.functions_unavailable_reason(*_FUNCTIONS)
    if reason:
        return [reason]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"cuda chain_attention_decode supports float16/bfloat16/float32, got {q.dtype}")
        return reasons
    d = int(q.shape[-1])
    if d not in kernels.HEAD_DIMS:
        reasons.append(f"cuda chain_attention_decode is compiled for head dims {kernels.HEAD_DIMS}, got {d}")
    counts = group_counts(kv_head_index)
    if len(set(counts)) != 1:
        reasons.append(f"every kv head must serve the same number of query heads, got counts {counts}")
    reasons += kernels.alignment_reasons(k_cache, v_cache)
    return reasons
