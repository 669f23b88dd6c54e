"""``chain_attention``'s ``cuda`` backend: PyTorch's fused attention (and flash-attn for varlen).

A chain attention is per-head standard attention once each query head is mapped to its kv head.
Instead of repeating K/V per query head (the paper's ``k.repeat``), the query heads are PERMUTED so
that the heads sharing a kv head are contiguous groups of equal size ``G``: the op is then a
standard GQA (query head ``j`` of the permuted order reads kv head ``j // G``), which the fused
kernels run without a copy of K/V; the output gets the inverse permutation (autograd of
``index_select`` carries both back). ``G`` is the gcd of the kv heads' group sizes, so the public
API's mappings (GQA, shared KV ``tile`` / ``chain_group``, every elastic scale: always equal
groups) never repeat K/V; an op call with unequal groups (e.g. 2 and 4) repeats a kv head only as
often as its group is a multiple of ``G`` (2 and 4 -> ``G`` 2, the second kv head twice): the
least repetition with one uniform GQA call. Unused kv heads are dropped.

Fused paths (on CUDA; the same code runs SDPA's math kernel on CPU tensors for the tests):
- padded layout, non-causal or ``Sq == Sk``: ``F.scaled_dot_product_attention(enable_gqa=...)``
  (SDPA picks flash / cuDNN, which take GQA, in fp16/bf16). In fp32 neither runs, and the
  memory-efficient kernel takes no GQA: K/V are repeated per query head there (no permutation).
- causal ``Sq > Sk``: the first ``Sq - Sk`` rows see no key (zeros, no gradient); the rest is square
  and runs as above.
- causal ``Sq < Sk`` (bottom-right; SDPA's ``is_causal`` is top-left): PyTorch's flash op
  ``aten._scaled_dot_product_flash_attention``, whose causal mask is bottom-right (what
  ``torch.nn.attention.bias.causal_lower_right`` runs, but that cannot be traced by
  ``torch.compile``), when SDPA's own check says flash can run; otherwise SDPA under a
  bottom-right boolean mask with repeated K/V (memory-efficient takes masks, not GQA).
- varlen: ``flash_attn.flash_attn_varlen_func`` (fp16/bf16, head dim <= 256, GQA) when flash-attn
  is installed; otherwise one SDPA call over the packed tokens under a block-diagonal mask, K/V
  repeated (its size, ``total_q * total_k``, is limited to ``MAX_MASK_ELEMENTS``; past that the
  backend declines).

Declined (``not_supported_reasons``, so ``auto`` falls through to Triton): ``seq_chains`` (SDPA
cannot skip inactive heads per sequence), ``deterministic=True`` with gradients outside
flash-attn's varlen path (the fused SDPA backwards are not guaranteed run-to-run reproducible),
head dims above 256 (no fused SDPA kernel), and oversized varlen masks.

Op (namespace ``colm_kernels``): ``chain_attention_cuda`` with the reference op's schema,
``CompositeImplicitAutograd`` over aten (and flash-attn) ops, so autograd and ``torch.compile``
trace through it.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.backends.cuda import SDPAParams

from ..._tables import index_vector
from .heads import group_rows
from .reference import _packed_positions, causal_mask

try:  # optional: the varlen fast path
    import flash_attn
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn = flash_attn_varlen_func = None
# flash-attn aligns the causal mask bottom-right since 2.1 (top-left before): older ones are not used.
if flash_attn is not None and tuple(int(p) for p in re.findall(r"\d+", flash_attn.__version__)[:2]) < (2, 1):
    flash_attn_varlen_func = None  # pragma: no cover
# ``deterministic`` (its backward without atomics) is a later argument than the varlen function.
_FLASH_DETERMINISTIC = (flash_attn_varlen_func is not None
                        and "deterministic" in inspect.signature(flash_attn_varlen_func).parameters)

# PyTorch's flash op: ``is_causal`` is bottom-right there (a module attribute so tests can fake it).
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention.default
MAX_HEAD_DIM = 256  # flash, cuDNN and memory-efficient SDPA kernels
MAX_MASK_ELEMENTS = 1 << 26  # varlen without flash-attn: total_q * total_k of the block-diagonal mask
_HALF = (torch.float16, torch.bfloat16)
# Dtypes an SDPA kernel runs as GQA without repeated K/V: flash and cuDNN (fp16/bf16); float64 runs
# only on the math kernel (CPU tests), which takes GQA too. fp32 gets K/V repeated (memory-efficient).
_GQA_DTYPES = _HALF + (torch.float64,)


@functools.lru_cache(maxsize=1024)
def _plan(kv_head_index: tuple, head_chain: tuple, n_kv: int, expand: bool):
    """``(q_perm, out_perm, kv_select, G)``: the permuted query heads (None: identity), the inverse
    permutation, the kv heads the permuted query groups read (None: ``0 .. n_kv - 1``), group size.
    ``expand``: one kv head per query head instead (``G`` 1, no permutation)."""
    if expand:
        kv_select = list(kv_head_index)
        return None, None, None if kv_select == list(range(n_kv)) else kv_select, 1
    heads, _ = group_rows(kv_head_index, head_chain, n_kv)
    G = functools.reduce(math.gcd, (len(h) for h in heads), 0)
    perm = [h for members in heads for h in members]
    kv_select = [g for g, members in enumerate(heads) for _ in range(len(members) // G)]
    inverse = [0] * len(perm)
    for j, h in enumerate(perm):
        inverse[h] = j
    identity = perm == sorted(perm)
    return (None if identity else perm, None if identity else inverse,
            None if kv_select == list(range(n_kv)) else kv_select, G)


def head_plan(kv_head_index: Sequence[int], head_chain: Sequence[int], n_kv: int, expand: bool = False):
    """The head permutation for ``kv_head_index`` (cached on the maps); see ``_plan``."""
    return _plan(tuple(int(i) for i in kv_head_index), tuple(int(c) for c in head_chain), int(n_kv),
                 bool(expand))


def _select(t: Tensor, index: Optional[list], dim: int) -> Tensor:
    if index is None:
        return t
    # While tracing (fake tensors) the index is a graph constant; eagerly, a cached device table.
    return t.index_select(dim, torch.tensor(index, device=t.device) if is_fake(t) else index_vector(index, t.device))


def _permuted(q, k, v, kv_head_index, head_chain, dim, expand):
    """``q`` with grouped heads, ``k``/``v`` with the kv heads each group reads, the inverse
    permutation, and whether it is GQA (a host bool: head counts may be symbolic when compiling)."""
    q_perm, out_perm, kv_select, G = head_plan(kv_head_index, head_chain, k.shape[dim], expand)
    return _select(q, q_perm, dim), _select(k, kv_select, dim), _select(v, kv_select, dim), out_perm, G > 1


def _flash_bottom_right_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether PyTorch's flash kernel takes these ``(B, S, H, D)`` inputs (SDPA's own check)."""
    if not (q.is_cuda and q.dtype in _HALF and torch.backends.cuda.flash_sdp_enabled()):
        return False
    return _sdpa_flash_check(q, k, v)


def _sdpa_flash_check(q: Tensor, k: Tensor, v: Tensor) -> bool:
    try:
        params = SDPAParams(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0, False,
                            bool(q.shape[2] != k.shape[2]))
        return bool(torch.backends.cuda.can_use_flash_attention(params))
    except (RuntimeError, TypeError):  # e.g. symbolic shapes while compiling: the masked path
        return False


def _flash_bottom_right(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal bottom-right attention on ``(B, H, S, D)`` by PyTorch's flash op (GQA native), head
    dim padded to a multiple of 8 as ``torch.nn.attention.bias`` does; ``scale`` stays explicit."""
    d = q.shape[-1]
    pad = -d % 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    else:  # the kernel reads rows with a unit stride (SDPA's front end checks this before flash)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = _flash_fwd(q, k, v, 0.0, is_causal=True, scale=scale)[0]
    return out[..., :d] if pad else out


def dense_attention(q: Tensor, k: Tensor, v: Tensor, kv_head_index: Sequence[int], head_chain: Sequence[int],
                    causal: bool, softmax_scale: float) -> Tensor:
    """The padded layout: ``q`` ``(B, Sq, Hq, D)`` over ``k``, ``v`` ``(B, Sk, Hkv, D)``."""
    sq, sk = q.shape[1], k.shape[1]
    blind = max(sq - sk, 0) if causal else 0  # rows that see no key
    bottom_right = causal and sq < sk  # SDPA's is_causal is top-left
    flash = bottom_right and _flash_bottom_right_ok(q, k, v)
    masked = bottom_right and not flash
    # A mask or fp32 rules out the GQA kernels (flash, cuDNN): repeat K/V for memory-efficient.
    expand = masked or q.dtype not in _GQA_DTYPES
    qp, kp, vp, out_perm, gqa = _permuted(q, k, v, kv_head_index, head_chain, 2, expand)
    qp, kp, vp = (t.transpose(1, 2) for t in (qp[:, blind:], kp, vp))
    if flash:
        out = _flash_bottom_right(qp, kp, vp, softmax_scale)
    elif masked:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=causal_mask(sq, sk, q.device)[None],
                                             scale=softmax_scale)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)
    out = out.transpose(1, 2)
    if blind:
        out = torch.cat([out.new_zeros(out.shape[0], blind, *out.shape[2:]), out], dim=1)
    return _select(out, out_perm, 2)


def _flash_varlen_ok(q: Tensor) -> bool:
    return flash_attn_varlen_func is not None and q.dtype in _HALF and q.shape[-1] <= MAX_HEAD_DIM


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, kv_head_index: Sequence[int], head_chain: Sequence[int],
                     causal: bool, softmax_scale: float, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, deterministic: bool) -> Tensor:
    """Packed ``q`` ``(total_q, Hq, D)`` over ``k``, ``v`` ``(total_k, Hkv, D)``: flash-attn's varlen
    kernel (bottom-right causal per sequence, zeros for rows that see no key), or SDPA under a
    block-diagonal mask (no host read of ``cu_seqlens`` either way)."""
    flash = _flash_varlen_ok(q)
    # flash-attn takes GQA; the masked SDPA call runs memory-efficient (no GQA): repeated K/V.
    qp, kp, vp, out_perm, _ = _permuted(q, k, v, kv_head_index, head_chain, 1, not flash)
    if flash:
        extra = {"deterministic": deterministic} if deterministic else {}  # declined where unsupported
        out = flash_attn_varlen_func(qp, kp, vp, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     dropout_p=0.0, softmax_scale=softmax_scale, causal=causal, **extra)
        return _select(out, out_perm, 1)
    seq_q, pos_q, len_q = _packed_positions(cu_seqlens_q, q.shape[0])
    seq_k, pos_k, len_k = _packed_positions(cu_seqlens_k, k.shape[0])
    visible = seq_q[:, None] == seq_k[None, :]
    if causal:  # bottom-right per sequence
        visible = visible & (pos_k[None, :] <= pos_q[:, None] + (len_k[None, :] - len_q[:, None]))
    has_key = visible.any(-1)
    # A row that sees no key reads key 0 (finite softmax), then outputs zeros and passes no gradient.
    visible[:, :1] |= ~has_key[:, None]
    out = F.scaled_dot_product_attention(qp.transpose(0, 1)[None], kp.transpose(0, 1)[None],
                                         vp.transpose(0, 1)[None], attn_mask=visible,
                                         scale=softmax_scale)[0].transpose(0, 1)
    out = torch.where(has_key[:, None, None], out, out.new_zeros(()))
    return _select(out, out_perm, 1)


torch.library.define(
    "colm_kernels::chain_attention_cuda",
    "(Tensor q, Tensor k, Tensor v, int[] kv_head_index, int[] head_chain, bool causal, "
    "Tensor? seq_chains, float softmax_scale, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
    "int max_seqlen_q=0, int max_seqlen_k=0, bool deterministic=False) -> Tensor",
)


@torch.library.impl("colm_kernels::chain_attention_cuda", "CompositeImplicitAutograd")
def _chain_attention_cuda(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale,
                          cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                          deterministic=False):
    if seq_chains is not None:
        raise ValueError("chain_attention_cuda does not take seq_chains (see not_supported_reasons)")
    if cu_seqlens_q is None:
        return dense_attention(q, k, v, kv_head_index, head_chain, causal, softmax_scale)
    return varlen_attention(q, k, v, kv_head_index, head_chain, causal, softmax_scale, cu_seqlens_q,
                            cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)


chain_attention_cuda = torch.ops.colm_kernels.chain_attention_cuda.default


def not_supported_reasons(q, k, v, kv_head_index, head_chain, causal, seq_chains, softmax_scale,
                          cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                          deterministic=False) -> list[str]:
    """Why this backend declines these inputs (device availability is checked elsewhere)."""
    reasons = []
    if seq_chains is not None:
        reasons.append("seq_chains is not supported: SDPA cannot skip inactive heads per sequence "
                       "(the triton backend skips them)")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}: no fused SDPA kernel")
    varlen = cu_seqlens_q is not None
    flash_varlen = varlen and _flash_varlen_ok(q)
    if varlen and not flash_varlen and q.shape[0] * k.shape[0] > MAX_MASK_ELEMENTS:
        why = "flash-attn is not installed" if flash_attn_varlen_func is None else \
            f"flash-attn's varlen kernel takes float16/bfloat16, got {q.dtype}"
        reasons.append(f"varlen without flash-attn ({why}) runs SDPA under a block-diagonal mask of "
                       f"total_q * total_k = {q.shape[0] * k.shape[0]} > {MAX_MASK_ELEMENTS} elements")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if deterministic and needs_grad and not (flash_varlen and _FLASH_DETERMINISTIC):
        reasons.append("deterministic=True: PyTorch's fused SDPA backwards are not guaranteed run-to-run "
                       "reproducible (only flash-attn's varlen kernel, fp16/bf16, takes deterministic; "
                       "the triton backend has a deterministic backward)")
    return reasons
