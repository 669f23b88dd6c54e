"""``chain_attention``: causal attention where chain i owns ``c_i`` query heads, the public function.

Layout ``(batch, seq, heads, head_dim)``. ``q`` carries the query heads of the active chains only,
so its head count selects the scale. Without KV sharing ``k``/``v`` carry the matching kv heads
(ordinary GQA, query head j reads kv head ``j // (n_q / n_kv)``); with KV sharing (CoLM-Air) they
carry all shared kv heads and ``kv_mapping`` (``tile`` or ``chain_group``) says which one each query
head reads.

Variable-length packed batches follow flash-attn's convention: ``q`` ``(total_q, Hq, D)``, ``k``/``v``
``(total_k, Hkv, D)``, int32 ``cu_seqlens_q``/``cu_seqlens_k`` ``(n_seq + 1,)`` cumulative offsets
from 0, and ``max_seqlen_q``/``max_seqlen_k`` upper bounds of the lengths (they size the kernels'
grids; a bucketed value is fine).
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ... import backends
from ...chains import KV_MAPPINGS, ChainsLike, as_chains
from .._checks import check_like, check_seq_chains, check_tensor, softmax_scale_or_default
from .._library import register_reference_op
from ..autocast import LOWER, autocast_op
from . import reference

OP = "chain_attention"
# Varlen rides on the trailing optional arguments: ``cu_seqlens_q``/``cu_seqlens_k`` None (and the
# max lengths 0) is the padded ``(B, S, H, D)`` layout. ``deterministic`` picks a backend's backward
# (the reference's is deterministic anyway).
SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, int[] kv_head_index, int[] head_chain, bool causal, "
    "Tensor? seq_chains, float softmax_scale, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
    "int max_seqlen_q=0, int max_seqlen_k=0, bool deterministic=False) -> Tensor"
)

chain_attention_reference = register_reference_op(
    f"{OP}_reference", reference.chain_attention, lambda q, *args: q.new_empty(q.shape), SCHEMA
)
backends.register(OP, "reference", __name__, "chain_attention_reference")
backends.register(OP, "triton", "colm_kernels.ops.chain_attention.triton_backend", "chain_attention_triton", reasons_fn="not_supported_reasons")
# PyTorch's fused attention: needs a CUDA device, not the compiled extension.
backends.register(OP, "cuda", "colm_kernels.ops.chain_attention.cuda_backend", "chain_attention_cuda",
                  reasons_fn="not_supported_reasons", availability=backends.cuda_device_unavailable_reason)
backends.register_bounds(OP, "colm_kernels.ops.chain_attention.bounds")


def head_maps(chains, n_q: int, n_kv: int, kv_sharing: bool, kv_mapping: str, *,
              q_heads: str = "q.shape[2]", k_heads: str = "k.shape[2]"):
    """``(scale, kv_head_index, head_chain)`` for ``n_q`` active query heads and ``n_kv`` kv heads.
    ``q_heads`` / ``k_heads`` name the head dims in errors (``q.shape[1]`` for packed varlen)."""
    chains = as_chains(chains)
    if kv_mapping not in KV_MAPPINGS:
        raise ValueError(f"kv_mapping must be one of {KV_MAPPINGS}, got {kv_mapping!r}")
    head_prefixes = tuple(itertools.accumulate(chains.sizes))
    if n_q not in head_prefixes:
        raise ValueError(
            f"{q_heads}={n_q} query heads is not the head count of any scale of "
            f"chains={chains.sizes}: expected one of {head_prefixes}"
        )
    scale = head_prefixes.index(n_q)
    if kv_sharing:
        chains.check_kv_sharing(n_kv, name=f"{k_heads} (shared kv heads)")
        kv_index = chains.kv_head_map(n_kv, kv_sharing=True, kv_mapping=kv_mapping, chain=scale)
    else:
        if n_kv <= 0 or n_q % n_kv:
            raise ValueError(
                f"{k_heads}={n_kv} kv heads must divide {q_heads}={n_q} query heads (GQA)"
            )
        group = n_q // n_kv
        if chains.total % group:
            raise ValueError(
                f"GQA group size {group} ({q_heads}={n_q} / {k_heads}={n_kv}) does not divide "
                f"sum(chains)={chains.total} for chains={chains.sizes}"
            )
        n_kv_total = chains.total // group
        chains.kv_head_counts(n_kv_total, name=f"n_kv_heads (from {k_heads}={n_kv})")
        kv_index = chains.kv_head_map(n_kv_total, chain=scale)
    return scale, list(kv_index), list(chains.head_chain()[:n_q])


def _check_cu_seqlens(name: str, cu: Tensor, total: int, tensor_name: str, q: Tensor,
                      check_values: bool) -> int | None:
    """Shape, dtype and device of one ``cu_seqlens_*``; with ``check_values`` (and not compiling)
    also its values (one host sync), returning the longest sequence's length (else None)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor (flash-attn convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of shape (n_seq + 1,), got shape {tuple(cu.shape)}")
    check_like("q", q, dtype=False, **{name: cu})
    if not check_values or torch.compiler.is_compiling():
        return None
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0]={values[0]}")
    steps = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(s < 0 for s in steps):
        i = next(i for i, s in enumerate(steps) if s < 0)
        raise ValueError(f"{name} must be non-decreasing, got {name}[{i}]={values[i]} > "
                         f"{name}[{i + 1}]={values[i + 1]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1]={values[-1]} must equal {tensor_name}.shape[0]={total} "
                         f"(the total number of packed tokens)")
    return max(steps, default=0)


def _check_max_seqlen(name: str, value, longest: int | None, cu_name: str) -> None:
    if value is None:
        raise ValueError(f"{name} is required with {cu_name} (an upper bound of the sequence lengths)")
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if longest is not None and value < longest:
        raise ValueError(f"{name}={value} is smaller than the longest sequence in {cu_name} ({longest})")


def _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, check_values) -> bool:
    """Whether the call is varlen; raises naming the argument when the pair is inconsistent."""
    given = {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    if all(t is None for t in given.values()):
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if value is not None:
                raise ValueError(f"{name} is only used with cu_seqlens_q and cu_seqlens_k (varlen); "
                                 f"got {name}={value!r} without them")
        return False
    for name, t in given.items():
        if t is None:
            other = "cu_seqlens_k" if name == "cu_seqlens_q" else "cu_seqlens_q"
            raise ValueError(f"{name} must be given together with {other} (varlen needs both)")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim) with cu_seqlens, "
                             f"got shape {tuple(t.shape)}")
    longest_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", q, check_values)
    longest_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", q, check_values)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1} (shapes "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)})")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q, "cu_seqlens_q")
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k, "cu_seqlens_k")
    return True


@autocast_op(LOWER, ("q", "k", "v"))
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
    *,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    check_values: bool = True,
    deterministic: bool = False,
) -> Tensor:
    """Attention of ``q`` ``(B, Sq, Hq, D)`` over ``k``, ``v`` ``(B, Sk, Hkv, D)``.

    Args:
        chains: chain configuration (``sum(chains)`` = total query heads).
        causal: causal mask, bottom-right aligned when ``Sq != Sk`` (KV cache); query rows that
            see no key (``Sq > Sk``) output zeros.
        kv_sharing: CoLM-Air: ``k``/``v`` hold all shared kv heads, mapped by ``kv_mapping``.
        seq_chains: optional integer tensor ``(B,)`` (``(n_seq,)`` for varlen): the last active
            chain of each sequence (at most the scale selected by ``Hq``); heads beyond it output
            exact zeros.
        softmax_scale: defaults to ``D ** -0.5``.
        cu_seqlens_q, cu_seqlens_k: variable-length packed batch (flash-attn convention, keyword
            only, both or neither): int32 ``(n_seq + 1,)`` cumulative offsets starting at 0 and
            ending at ``total_q`` / ``total_k``. Then ``q`` is ``(total_q, Hq, D)``, ``k``/``v``
            ``(total_k, Hkv, D)``, and sequence b is ``q[cu_q[b]:cu_q[b+1]]`` attending to
            ``k[cu_k[b]:cu_k[b+1]]`` (causal bottom-right aligned per sequence; empty sequences
            allowed).
        max_seqlen_q, max_seqlen_k: required with ``cu_seqlens_*``: upper bounds of the
            sequence lengths (they size the kernels' grids; checked when not compiling).
        check_values: check the values of ``seq_chains`` and ``cu_seqlens_*`` on the host (a GPU
            sync each). A training loop whose metadata is valid by construction may pass False:
            the kernels then trust it.
        deterministic: the backward's trade-off (keyword only). False (default): the Triton
            backward runs one pass over the key blocks and adds dQ by fp32 atomics
            (FlashAttention-2's 5 matmuls per tile; fastest, but the order of the additions, and so
            the last bits of dQ, varies from run to run on a GPU). True: dQ comes from a second pass
            that recomputes QK^T and dP (7 matmuls per tile), and the whole backward is bitwise
            reproducible run to run. The forward and the reference backend are the same either way.

    Returns ``(B, Sq, Hq, D)`` (varlen: ``(total_q, Hq, D)``) in ``q``'s dtype.
    """
    chains = as_chains(chains)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    varlen = _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, check_values)
    ndim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim)
    check_like("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if varlen:
        head_dim, q_heads, k_heads, n_seq = 2, "q.shape[1]", "k.shape[1]", cu_seqlens_q.shape[0] - 1
    else:
        head_dim, q_heads, k_heads, n_seq = 3, "q.shape[2]", "k.shape[2]", q.shape[0]
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k.shape[0]={k.shape[0]} (batch) must equal q.shape[0]={q.shape[0]}")
    if k.shape[head_dim] != q.shape[head_dim]:
        raise ValueError(f"k.shape[{head_dim}]={k.shape[head_dim]} (head_dim) must equal "
                         f"q.shape[{head_dim}]={q.shape[head_dim]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(kv_sharing, bool):
        raise TypeError(f"kv_sharing must be a bool, got {kv_sharing!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    scale, kv_index, head_chain = head_maps(chains, q.shape[head_dim - 1], k.shape[head_dim - 1],
                                            kv_sharing, kv_mapping, q_heads=q_heads, k_heads=k_heads)
    check_seq_chains(seq_chains, q, n_seq, scale, check_values)
    softmax_scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    tensors = [q, k, v] + ([seq_chains] if seq_chains is not None else [])
    args = (q, k, v, kv_index, head_chain, causal, seq_chains, float(softmax_scale))
    inputs = dict(q=q, k=k, v=v, kv_head_index=kv_index, head_chain=head_chain, causal=causal,
                  seq_chains=seq_chains, softmax_scale=float(softmax_scale))
    extra = dict(deterministic=deterministic)
    if varlen:
        tensors += [cu_seqlens_q, cu_seqlens_k]
        extra.update(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
                     max_seqlen_k=int(max_seqlen_k))
    return backends.dispatch(OP, tensors, **inputs, **extra)(*args, **extra)
