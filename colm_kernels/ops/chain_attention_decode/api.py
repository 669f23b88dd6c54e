"""``chain_attention_decode``: chain attention of a few new tokens over a KV cache (flash-decoding).

Like flash-attn's ``flash_attn_with_kvcache``: the new tokens' K/V are already in the cache, each
sequence has its own valid length, the mask is causal bottom-right per sequence, and the cache is
contiguous or paged (flash-attn's ``block_table`` convention). Inference only (no autograd).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import backends
from ...chains import ChainsLike, as_chains
from .._checks import (check_int_values, check_like, check_seq_chains, check_tensor,
                       softmax_scale_or_default)
from .._library import register_reference_op
from ..autocast import LOWER, autocast_op
from ..chain_attention.api import head_maps
from . import reference
from .limits import MAX_DECODE_TOKENS

OP = "chain_attention_decode"
SCHEMA = (
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, int[] kv_head_index, "
    "int[] head_chain, Tensor? seq_chains, float softmax_scale, Tensor? block_table=None) -> Tensor"
)

chain_attention_decode_reference = register_reference_op(
    f"{OP}_reference", reference.chain_attention_decode, lambda q, *args: q.new_empty(q.shape), SCHEMA
)
backends.register(OP, "reference", __name__, "chain_attention_decode_reference")
backends.register(OP, "triton", "colm_kernels.ops.chain_attention_decode.triton_backend",
                  "chain_attention_decode_triton", reasons_fn="not_supported_reasons")
backends.register(OP, "cuda", "colm_kernels.ops.chain_attention_decode.cuda_backend",
                  "chain_attention_decode_cuda", reasons_fn="not_supported_reasons")
backends.register_bounds(OP, "colm_kernels.ops.chain_attention_decode.bounds")


def decode_head_maps(chains, n_q: int, n_kv_cache: int, kv_sharing: bool, kv_mapping: str):
    """``(scale, kv_head_index, head_chain, n_kv)`` for ``n_q`` active query heads over a cache
    holding ``n_kv_cache`` kv heads; the kernels read kv heads ``0 .. n_kv - 1`` only.

    With KV sharing the cache holds the shared kv heads and every one is read. Without it the cache
    holds the whole model's kv heads (GQA group ``sum(chains) / n_kv_cache``) and the active scale
    reads the prefix owned by its chains, ``n_q / group`` heads.
    """
    chains = as_chains(chains)
    if kv_sharing:
        n_kv = n_kv_cache
    else:
        if n_kv_cache <= 0 or chains.total % n_kv_cache:
            raise ValueError(
                f"k_cache.shape[2]={n_kv_cache} must be the model's n_kv_heads, a divisor of "
                f"sum(chains)={chains.total} for chains={chains.sizes} (without kv_sharing the cache "
                "holds every chain's kv heads)"
            )
        group = chains.total // n_kv_cache
        if n_q % group:
            raise ValueError(
                f"q.shape[2]={n_q} query heads is not a multiple of the GQA group size {group} "
                f"(sum(chains)={chains.total} / k_cache.shape[2]={n_kv_cache})"
            )
        n_kv = n_q // group
    scale, kv_index, head_chain = head_maps(chains, n_q, n_kv, kv_sharing, kv_mapping)
    return scale, kv_index, head_chain, n_kv


def _check_cache_layout(q: Tensor, k_cache: Tensor, block_table) -> int:
    """Check the cache's leading dims against ``q`` and ``block_table``; return the keys each
    sequence can hold (``S_max``, or ``max_blocks_per_seq * page_size`` for a paged cache)."""
    if block_table is None:
        if k_cache.shape[0] != q.shape[0]:
            raise ValueError(f"k_cache.shape[0]={k_cache.shape[0]} (batch) must equal q.shape[0]={q.shape[0]} "
                             "(or pass block_table for a paged cache)")
        return k_cache.shape[1]
    if not isinstance(block_table, Tensor):
        raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be an int32 tensor (flash-attn's convention), got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must have shape (batch={q.shape[0]}, max_blocks_per_seq), got "
                         f"{tuple(block_table.shape)}")
    check_like("q", q, dtype=False, block_table=block_table)
    if k_cache.shape[0] < 1 or k_cache.shape[1] < 1:
        raise ValueError(f"a paged k_cache (num_blocks, page_size, Hkv, D) needs num_blocks >= 1 and "
                         f"page_size >= 1, got shape {tuple(k_cache.shape)}")
    return k_cache.shape[1] * block_table.shape[1]


def _check_cache_values(cache_seqlens: Tensor, k_cache: Tensor, block_table, capacity: int) -> None:
    """Host-side value checks (one sync each): every length fits its sequence's cache, and every
    block-table entry a sequence uses (its first ``cdiv(L_b, page_size)``) names a block."""
    try:
        check_int_values("cache_seqlens", cache_seqlens, 0, capacity)
    except ValueError as e:
        if block_table is None or int(cache_seqlens.max()) <= capacity:
            raise
        raise ValueError(f"{e}: too few blocks, block_table.shape[1]={block_table.shape[1]} blocks of "
                         f"page_size={k_cache.shape[1]} hold {capacity} keys per sequence") from None
    if block_table is None or torch.compiler.is_compiling():
        return
    page, n_blocks = k_cache.shape[1], k_cache.shape[0]
    used = (torch.arange(block_table.shape[1], device=block_table.device)[None, :]
            < ((cache_seqlens.to(torch.int64) + page - 1) // page)[:, None])
    check_int_values(f"block_table entries in use (k_cache.shape[0]={n_blocks} blocks)",
                     torch.where(used, block_table, 0), 0, n_blocks - 1)


@autocast_op(LOWER, ("q", "k_cache", "v_cache"))
def chain_attention_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    chains: ChainsLike,
    kv_sharing: bool = False,
    kv_mapping: str = "tile",
    seq_chains: Tensor | None = None,
    softmax_scale: float | None = None,
    *,
    block_table: Tensor | None = None,
    check_values: bool = True,
) -> Tensor:
    """Attention of ``q`` ``(B, Sq, Hq, D)`` (``1 <= Sq <= MAX_DECODE_TOKENS`` = 128 new tokens per
    sequence) over a KV cache: contiguous, ``k_cache``, ``v_cache`` ``(B, S_max, Hkv_cache, D)``,
    or paged, ``(num_blocks, page_size, Hkv_cache, D)`` with ``block_table``.

    Args:
        cache_seqlens: integer ``(B,)``: valid length of each sequence, the ``Sq`` new tokens
            (already written into the cache) included, in ``[0, S_max]`` (paged: ``[0,
            max_blocks_per_seq * page_size]``). Query ``i`` of sequence ``b`` sees keys
            ``j < cache_seqlens[b] - Sq + i + 1``; a row that sees no key outputs zeros. Cache
            positions at or past a sequence's length are never read.
        chains: chain configuration; ``Hq`` (a prefix head count) selects the scale.
        kv_sharing: CoLM-Air: the cache holds the shared kv heads, mapped by ``kv_mapping``.
            Without it the cache holds the whole model's kv heads (``Hkv_cache`` = the model's
            ``n_kv_heads``, GQA group ``sum(chains) / Hkv_cache``) and only the first
            ``Hq / group`` of them (the active chains') are read.
        seq_chains: optional integer ``(B,)``: the last active chain of each sequence (at most the
            scale selected by ``Hq``); heads beyond it output exact zeros and cost no work.
        softmax_scale: defaults to ``D ** -0.5``.
        block_table: optional int32 ``(B, max_blocks_per_seq)`` (flash-attn's ``block_table``):
            key ``j`` of sequence ``b`` is ``k_cache[block_table[b, j // page_size], j %
            page_size]``. Only the first ``cdiv(cache_seqlens[b], page_size)`` entries of row
            ``b`` are read; they must be in ``[0, num_blocks)``. Sequences may share blocks.
        check_values: check the values of ``cache_seqlens`` / ``seq_chains`` / the block-table
            entries in use on the host (one GPU sync each). A decode loop whose values are valid
            by construction (the models' ``KVCache``) passes False; the kernels clamp lengths
            and block indices into the cache either way.

    ``q`` may have any strides (one with a strided last dim is copied). The caches may have any
    strides with a unit last dim (a view of a larger buffer is read in place). Returns ``(B, Sq,
    Hq, D)`` in ``q``'s dtype. Forward only: inputs that require grad (with grad mode on) raise
    ``RuntimeError``.
    """
    chains = as_chains(chains)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=4)
    check_like("q", q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    capacity = _check_cache_layout(q, k_cache, block_table)
    if k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"k_cache.shape[3]={k_cache.shape[3]} (head_dim) must equal q.shape[3]={q.shape[3]}")
    if not 1 <= q.shape[1] <= MAX_DECODE_TOKENS:
        raise ValueError(
            f"q.shape[1]={q.shape[1]} new tokens must be in [1, {MAX_DECODE_TOKENS}] "
            "(use chain_attention for prefill)"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")
    if not isinstance(kv_sharing, bool):
        raise TypeError(f"kv_sharing must be a bool, got {kv_sharing!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError(
            "chain_attention_decode is inference-only (no backward): call it under torch.no_grad() "
            "or torch.inference_mode(), or use chain_attention for training"
        )
    scale, kv_index, head_chain, _ = decode_head_maps(chains, q.shape[2], k_cache.shape[2], kv_sharing, kv_mapping)
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, kind="int")
    check_like("q", q, dtype=False, cache_seqlens=cache_seqlens)
    if cache_seqlens.shape[0] != q.shape[0]:
        raise ValueError(
            f"cache_seqlens must have one entry per sequence ({q.shape[0]}), got {cache_seqlens.shape[0]}"
        )
    if check_values:
        _check_cache_values(cache_seqlens, k_cache, block_table, capacity)
    check_seq_chains(seq_chains, q, q.shape[0], scale, check_values)
    softmax_scale = softmax_scale_or_default(softmax_scale, q.shape[3])
    if q.shape[-1] > 1 and q.stride(-1) != 1:
        q = q.contiguous()  # every backend then reads rows with a unit stride
    tensors = [q, k_cache, v_cache] + [t for t in (seq_chains, block_table) if t is not None]
    op = backends.dispatch(
        OP, tensors, q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
        kv_head_index=kv_index, head_chain=head_chain, seq_chains=seq_chains,
        softmax_scale=float(softmax_scale), block_table=block_table,
    )
    return op(q, k_cache, v_cache, cache_seqlens, kv_index, head_chain, seq_chains, float(softmax_scale),
              block_table)
