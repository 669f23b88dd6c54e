"""``chain_attention``: causal attention where chain i owns ``c_i`` query heads, the public function.

Layout ``(batch, seq, heads, head_dim)``. ``q`` carries the query heads of the active chains only,
so its head count selects the scale. Without KV sharing ``k``/``v`` carry the matching kv heads
(ordinary GQA, query head j reads kv head ``j // (n_q / n_kv)``); with KV sharing (CoLM-Air) they
carry all shared kv heads and ``kv_mapping`` (``tile`` or ``chain_group``) says which one each query
head reads.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ... import backends
from ...chains import KV_MAPPINGS, ChainsLike, as_chains
from .._checks import check_like, check_tensor
from .._library import register_reference_op
from . import reference

OP = "chain_attention"
SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, int[] kv_head_index, int[] head_chain, bool causal, "
    "Tensor? seq_chains, float softmax_scale) -> Tensor"
)

chain_attention_reference = register_reference_op(
    f"{OP}_reference", reference.chain_attention, lambda q, *args: q.new_empty(q.shape), SCHEMA
)
backends.register(OP, "reference", __name__, "chain_attention_reference")
backends.register(OP, "triton", "colm_kernels.ops.chain_attention.triton", "chain_attention_triton", reasons_fn="not_supported_reasons")


def head_maps(chains, n_q: int, n_kv: int, kv_sharing: bool, kv_mapping: str):
    """``(scale, kv_head_index, head_chain)`` for ``n_q`` active query heads and ``n_kv`` kv heads."""
    chains = as_chains(chains)
    if kv_mapping not in KV_MAPPINGS:
        raise ValueError(f"kv_mapping must be one of {KV_MAPPINGS}, got {kv_mapping!r}")
    head_prefixes = tuple(itertools.accumulate(chains.sizes))
    if n_q not in head_prefixes:
        raise ValueError(
            f"q.shape[2]={n_q} query heads is not the head count of any scale of "
            f"chains={chains.sizes}: expected one of {head_prefixes}"
        )
    scale = head_prefixes.index(n_q)
    if kv_sharing:
        chains.check_kv_sharing(n_kv, name="k.shape[2] (shared kv heads)")
        kv_index = chains.kv_head_map(n_kv, kv_sharing=True, kv_mapping=kv_mapping, chain=scale)
    else:
        if n_kv <= 0 or n_q % n_kv:
            raise ValueError(
                f"k.shape[2]={n_kv} kv heads must divide q.shape[2]={n_q} query heads (GQA)"
            )
        group = n_q // n_kv
        if chains.total % group:
            raise ValueError(
                f"GQA group size {group} (q.shape[2]={n_q} / k.shape[2]={n_kv}) does not divide "
                f"sum(chains)={chains.total} for chains={chains.sizes}"
            )
        n_kv_total = chains.total // group
        chains.kv_head_counts(n_kv_total, name=f"n_kv_heads (from k.shape[2]={n_kv})")
        kv_index = chains.kv_head_map(n_kv_total, chain=scale)
    return scale, list(kv_index), list(chains.head_chain()[:n_q])


def chain_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chains: ChainsLike,
    causal: bool = True,
    kv_sharing: bool = False,
    kv_mapping: str = "tile",
    seq_chains: Tensor | None = None,
    softmax_scale: float | None = None,
) -> Tensor:
    """Attention of ``q`` ``(B, Sq, Hq, D)`` over ``k``, ``v`` ``(B, Sk, Hkv, D)``.

    Args:
        chains: chain configuration (``sum(chains)`` = total query heads).
        causal: causal mask, bottom-right aligned when ``Sq != Sk`` (KV cache); query rows that
            see no key (``Sq > Sk``) output zeros.
        kv_sharing: CoLM-Air: ``k``/``v`` hold all shared kv heads, mapped by ``kv_mapping``.
        seq_chains: optional integer tensor ``(B,)``: the last active chain of each sequence
            (at most the scale selected by ``Hq``); heads beyond it output exact zeros.
        softmax_scale: defaults to ``D ** -0.5``.

    Returns ``(B, Sq, Hq, D)`` in ``q``'s dtype.
    """
    chains = as_chains(chains)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_like("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k.shape[0]={k.shape[0]} (batch) must equal q.shape[0]={q.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k.shape[3]={k.shape[3]} (head_dim) must equal q.shape[3]={q.shape[3]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(kv_sharing, bool):
        raise TypeError(f"kv_sharing must be a bool, got {kv_sharing!r}")
    scale, kv_index, head_chain = head_maps(chains, q.shape[2], k.shape[2], kv_sharing, kv_mapping)
    if seq_chains is not None:
        check_tensor("seq_chains", seq_chains, ndim=1, kind="int")
        check_like("q", q, dtype=False, seq_chains=seq_chains)
        if seq_chains.shape[0] != q.shape[0]:
            raise ValueError(
                f"seq_chains must have one entry per sequence ({q.shape[0]}), got {seq_chains.shape[0]}"
            )
        if not torch.compiler.is_compiling() and seq_chains.numel():
            lo, hi = int(seq_chains.min()), int(seq_chains.max())
            if lo < 0 or hi > scale:
                raise ValueError(
                    f"seq_chains values must be in [0, {scale}] (the scale q's heads select), "
                    f"got values in [{lo}, {hi}]"
                )
    if softmax_scale is None:
        softmax_scale = q.shape[3] ** -0.5
    elif (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
          or not 0 < softmax_scale < float("inf")):
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
    tensors = [q, k, v] + ([seq_chains] if seq_chains is not None else [])
    op = backends.dispatch(
        OP, tensors, q=q, k=k, v=v, kv_head_index=kv_index, head_chain=head_chain,
        causal=causal, seq_chains=seq_chains, softmax_scale=float(softmax_scale),
    )
    return op(q, k, v, kv_index, head_chain, causal, seq_chains, float(softmax_scale))
