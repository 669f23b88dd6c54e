"""Host-side kv-head packing shared by the attention kernels (training, decode; Triton and CUDA).

Every kv head ``g`` serves the same number G of query heads (``kv_head_index[h] == g``); the
kernels read them from ``(Hkv, G)`` tables sorted by ``(head_chain[h], h)``, so the heads that are
active for a sequence (``head_chain[h] <= seq_chains[b]``) are a prefix of each group.

- ``group_rows``: those tables, as tuples (cached on the head maps).
- ``group_counts`` / ``layout_reasons``: whether a head mapping packs into equal groups.
- Constants of the kernels: ``LOG2E``, the Triton kernels' head dim range, ``MAX_DECODE_TOKENS``.

No ``triton`` import here: the CUDA backend uses this module too.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "LOG2E",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
    "MAX_DECODE_TOKENS",
    "group_rows",
    "group_counts",
    "layout_reasons",
]

LOG2E = 1.4426950408889634  # softmax in exp2: scores are scaled by softmax_scale * log2(e)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # head dims (powers of two) of the Triton kernels
MAX_DECODE_TOKENS = 128  # new tokens per sequence of chain_attention_decode (flash-attn tests 64, 128)


@functools.lru_cache(maxsize=1024)
def _group_rows(kv_head_index: Tuple[int, ...], head_chain: Tuple[int, ...], n_kv: Optional[int]):
    n = max(kv_head_index) + 1 if n_kv is None else n_kv
    heads, chains = [], []
    for g in range(n):
        members = sorted((h for h, i in enumerate(kv_head_index) if i == g), key=lambda h: (head_chain[h], h))
        heads.append(tuple(members))
        chains.append(tuple(head_chain[h] for h in members))
    return tuple(heads), tuple(chains)


def group_rows(kv_head_index: Sequence[int], head_chain: Sequence[int], n_kv: Optional[int] = None):
    """``(heads, chains)``: for each kv head ``g`` in ``range(n_kv)`` (default: ``0 ..
    max(kv_head_index)``), its query heads sorted by ``(chain, head)``, and their chains (tuples
    of tuples, cached on the head maps)."""
    return _group_rows(tuple(int(i) for i in kv_head_index), tuple(int(c) for c in head_chain),
                       None if n_kv is None else int(n_kv))


def group_counts(kv_head_index: Sequence[int], n_kv: Optional[int] = None) -> List[int]:
    """How many query heads each kv head ``g`` in ``range(n_kv)`` (default: ``0 ..
    max(kv_head_index)``, none for an empty mapping) serves."""
    kv = [int(i) for i in kv_head_index]
    if n_kv is None:
        n_kv = max(kv) + 1 if kv else 0
    return [kv.count(g) for g in range(n_kv)]


def layout_reasons(n_q: int, n_kv: int, kv_head_index: Sequence[int], head_chain: Sequence[int],
                   *, kv_prefix: bool = False) -> List[str]:
    """Why the kernels cannot pack this head mapping (empty: they can).

    ``n_kv`` kv heads are given; the mapping must use all of them (training), or with
    ``kv_prefix`` a prefix ``0 .. max(kv_head_index)`` of them (decode: the cache's kv heads).
    """
    kv = [int(i) for i in kv_head_index]
    if len(kv) != n_q or len(head_chain) != n_q:
        return [f"kv_head_index and head_chain must have one entry per query head ({n_q}), "
                f"got {len(kv)} and {len(head_chain)}"]
    if n_kv <= 0 or any(not 0 <= i < n_kv for i in kv):
        where = " (the cache's kv heads)" if kv_prefix else ""
        return [f"kv_head_index entries must be in [0, {n_kv}){where}, got {kv}"]
    counts = group_counts(kv, None if kv_prefix else n_kv)
    if len(set(counts)) != 1:
        return [f"every kv head must serve the same number of query heads (packed groups), "
                f"got counts {counts} for kv_head_index={kv}"]
    return []
