"""What the decode kernels (Triton and CUDA) take: head dims and new tokens per sequence.

Shared by both backends' reasons and launchers; no ``triton`` import (the CUDA backend uses it).
The training attention kernels keep their own head-dim range (``chain_attention.heads``).
"""
from __future__ import annotations

from typing import List

import torch

from ..chain_attention.heads import MAX_DECODE_TOKENS

__all__ = ["DECODE_DTYPES", "DECODE_HEAD_DIMS", "MAX_DECODE_TOKENS", "dtype_reasons", "head_dim_reasons",
           "padded_head_dim"]

DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Every multiple of 8 up to 256 (flash-attn's set): a head-dim row is then a whole number of
# 16-byte vectors in every dtype. The kernels pad it to a power of two (at least 16) inside.
DECODE_HEAD_DIMS = tuple(range(8, 257, 8))


def padded_head_dim(head_dim: int) -> int:
    """The power of two (>= 16, what ``tl.dot`` needs) the kernels compute ``head_dim`` at."""
    p = 16
    while p < head_dim:
        p *= 2
    return p


def head_dim_reasons(backend: str, head_dim: int) -> List[str]:
    """Why the ``backend`` decode kernels cannot take ``head_dim`` (empty: they can)."""
    if head_dim in DECODE_HEAD_DIMS:
        return []
    return [f"{backend} chain_attention_decode takes head dims that are multiples of 8 in "
            f"[{DECODE_HEAD_DIMS[0]}, {DECODE_HEAD_DIMS[-1]}], got {head_dim}"]


def dtype_reasons(backend: str, dtype: torch.dtype) -> List[str]:
    """Why the ``backend`` decode kernels cannot take ``dtype`` (empty: they can)."""
    if dtype in DECODE_DTYPES:
        return []
    return [f"{backend} chain_attention_decode supports float16/bfloat16/float32, got {dtype}"]
