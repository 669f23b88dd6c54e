"""What each backend of ``chain_attention_decode`` executes on an H100, for ``auto``
(``colm_kernels.auto_bounds``).

Both backends pack, per (sequence, kv head), the ``G * Sq`` query rows that read that kv head (G
query heads per kv head, Sq new tokens) and stream the keys of the cache once per row block:
- ``triton``: row blocks of up to 64 rows (32 at D=256, 16 in fp32) on tensor cores (``tl.dot``,
  M tiles below wgmma's: mma.sync rate), or FMA units for fp32;
- ``cuda``: row blocks of 8 rows on fp32 CUDA cores.
So K/V is read once per row block: once for one token and small groups, ``ceil(G * Sq / 8)`` times
on the CUDA kernel for a chunk of new tokens. The cache length is its capacity (``cache_seqlens``
lives on the device, and reading it would stall the host); both backends scale alike with it.
"""
from __future__ import annotations

from typing import Dict, Optional

from ...auto_bounds import Bound, concrete_shape, dtype_name, pow2_bucket
from .limits import padded_head_dim

CUDA_ROWS = 8  # csrc/chain_attention_decode: kMaxRows


def _layout(q, k_cache, kv_head_index, block_table) -> Optional[dict]:
    qs, ks = concrete_shape(q), concrete_shape(k_cache)
    if qs is None or ks is None:
        return None
    batch, sq, hq, d = qs
    if block_table is not None:
        bt = concrete_shape(block_table)
        if bt is None:
            return None
        length = bt[1] * ks[1]  # pages per sequence x page size
    else:
        length = ks[1]
    n_kv = max(kv_head_index) + 1
    group = -(-hq // n_kv)
    return dict(batch=batch, sq=sq, hq=hq, d=d, length=length, n_kv=n_kv, rows=sq * group,
                es=q.element_size(), fp32=q.element_size() == 4)


def _bound(lay: dict, block_rows: int, kind: str, note: str) -> Bound:
    n_blocks = -(-lay["rows"] // block_rows)
    dp = padded_head_dim(lay["d"])
    kv_once = 2 * lay["batch"] * lay["n_kv"] * lay["length"] * lay["d"] * lay["es"]
    q_and_out = 2 * lay["batch"] * lay["sq"] * lay["hq"] * lay["d"] * lay["es"]
    # QK^T and PV per row block, at the padded head dim and the block's whole rows
    flops = 4 * lay["batch"] * lay["n_kv"] * n_blocks * block_rows * lay["length"] * dp
    reads = f"K/V read {n_blocks}x" if n_blocks > 1 else "K/V read once"
    return Bound({kind: flops}, kv_once * n_blocks + q_and_out, f"{reads} ({note})")


def bounds(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains, softmax_scale,
           block_table=None) -> Dict[str, Bound]:
    lay = _layout(q, k_cache, kv_head_index, block_table)
    if lay is None:
        return {}
    from .triton_kernels import gpu_row_block

    tile = gpu_row_block(padded_head_dim(lay["d"]), lay["rows"], lay["fp32"])
    cuda_rows = min(CUDA_ROWS, lay["rows"])
    return {
        "triton": _bound(lay, tile, "fp32_fma" if lay["fp32"] else "mma_sync", f"{tile}-row tensor-core tiles"),
        "cuda": _bound(lay, cuda_rows, "fp32_fma", f"{cuda_rows}-row blocks on CUDA cores"),
    }


def shape_class(q, k_cache, v_cache, cache_seqlens, kv_head_index, head_chain, seq_chains, softmax_scale,
                block_table=None) -> Optional[str]:
    """Timing-table key: dtype, padded head dim, packed rows per kv head (power of two), paged."""
    lay = _layout(q, k_cache, kv_head_index, block_table)
    if lay is None:
        return None
    return f"{dtype_name(q)}-D{padded_head_dim(lay['d'])}-rows{pow2_bucket(lay['rows'])}" + (
        "-paged" if block_table is not None else "")
