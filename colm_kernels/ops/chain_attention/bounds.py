"""What each backend of ``chain_attention`` executes on an H100, for ``auto``
(``colm_kernels.auto_bounds``).

Both backends compute the same (query, key) pairs: ``4 * pairs * H * D`` FLOPs forward and the
FlashAttention-2 backward's ``10 * pairs * H * D``. The unit differs:
- ``triton``: 16-bit inputs on wgmma (every kept config, ``colm-bench --static``), fp32 on FMA units;
- ``cuda`` (``scaled_dot_product_attention``: PyTorch's flash kernel, or flash-attn 2 for varlen):
  FlashAttention-2 code, warp-level ``mma.sync`` on Hopper; fp32 runs the memory-efficient kernel
  on CUDA cores.
Bytes: q, k, v read and the output written once (forward), q, k, v, out, dout read and dq, dk, dv
written once (backward). The ``cuda`` path (``cuda_backend.py``) also moves:
- the query heads gathered into kv-head order and the output scattered back (and dout, dq in the
  backward) when the heads are not already in that order;
- K/V repeated per query head in fp32 (no fused GQA kernel there) and for varlen without flash-attn;
- varlen without flash-attn: one call over every (query, key) pair of the packed batch under a
  block-diagonal mask (``T_q * T_k`` pairs, and the mask's bytes).
Varlen pairs are otherwise bounded by ``tokens * max_seqlen_k`` (the lengths live on the device).
"""
from __future__ import annotations

from typing import Dict, Optional

from ...auto_bounds import Bound, concrete_shape, dtype_name, needs_grad


def _work(q, k, causal, cu_seqlens_q, max_seqlen_k) -> Optional[tuple]:
    qs, ks = concrete_shape(q), concrete_shape(k)
    if qs is None or ks is None:
        return None
    if cu_seqlens_q is not None:  # (T, H, D)
        pairs = qs[0] * int(max_seqlen_k)
        heads, d = qs[1], qs[2]
    else:  # (B, S, H, D)
        pairs = qs[0] * qs[1] * ks[1]
        heads, d = qs[2], qs[3]
    if causal:
        pairs //= 2  # about half the pairs; the same for every backend
    return pairs, heads, d


def bounds(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale, deterministic=False,
           cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> Dict[str, Bound]:
    work = _work(q, k, causal, cu_seqlens_q, max_seqlen_k)
    if work is None:
        return {}
    from .cuda_backend import flash_attn_varlen_func

    pairs, heads, d = work
    es, fp32 = q.element_size(), q.element_size() == 4
    q_bytes, kv_bytes = q.numel() * es, 2 * k.numel() * es
    train = needs_grad(q, k, v)
    matmuls = 4 + (10 if train else 0)
    nbytes = (2 * q_bytes + kv_bytes) + ((3 * q_bytes + 2 * kv_bytes) if train else 0)
    triton = Bound({"fp32_fma" if fp32 else "wgmma": matmuls * pairs * heads * d}, nbytes)

    notes, extra, cuda_pairs = [], 0, pairs
    if list(kv_head_index) != sorted(kv_head_index):  # gather q / scatter out (+ dout, dq)
        extra += (4 if train else 2) * 2 * q_bytes
        notes.append("query heads permuted into kv-head order")
    masked_varlen = cu_seqlens_q is not None and (flash_attn_varlen_func is None or fp32)
    if fp32 or masked_varlen:  # K/V written per query head, then read
        extra += 2 * kv_bytes * max(1, heads // (max(kv_head_index) + 1))
        notes.append("K/V repeated per query head")
    if masked_varlen:
        cuda_pairs = q.shape[0] * k.shape[0]
        extra += cuda_pairs  # the boolean mask
        notes.append("varlen as one masked call over every packed pair")
    cuda = Bound({"fp32_fma" if fp32 else "mma_sync": matmuls * cuda_pairs * heads * d}, nbytes + extra,
                 "; ".join(notes))
    return {"triton": triton, "cuda": cuda}


def shape_class(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale, deterministic=False,
                cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> Optional[str]:
    """Timing-table key: dtype, head dim, causal, varlen, training or not."""
    return (f"{dtype_name(q)}-D{q.shape[-1]}-{'causal' if causal else 'full'}"
            f"-{'varlen' if cu_seqlens_q is not None else 'padded'}-{'train' if needs_grad(q, k, v) else 'infer'}")
