"""Triton kernels for the multi-chain (Matryoshka-style) cross-entropy, forward and backward.

Math (COLM_SPEC section 3). Hidden ``h`` is ``(N, P)`` (N tokens, ``P`` the prefix width of the
active scales ``0..NS-1``), weight ``W`` is ``(V, D)`` with ``D >= P``, chain ``c`` owns columns
``[o_c, o_(c+1))`` of both (``offsets = (0, P_1, ..., P)``, NS = ``len(offsets) - 1``):

    x_s      = sum_{c <= s} h[:, chain c] @ W[:, chain c]^T            (never materialised)
    z_s      = softcap * tanh(x_s / softcap)       (or x_s without softcap)
    lse_s[i] = logsumexp_v z_s[i, v]
    ce_s[i]  = lse_s[i] - (1 - eps) z_s[i, t_i] - eps / V * sum_v z_s[i, v]   (label smoothing eps)
    zl_s[i]  = c_z * lse_s[i]^2                                              (z-loss, c_z >= 0)
    out[0, s, i] = ce_s[i] + zl_s[i],  out[1, s, i] = zl_s[i]  (0 on ignored rows; then reduced)

Backward. With upstream weights per scale and row ``a_s[i]`` (for the loss, already divided by the
number of rows that count for ``mean``) and ``b_s[i]`` (for the loss plus the z-loss output):

    dz_s = p_s (a_s + 2 c_z lse_s b_s) - a_s ((1 - eps) onehot(t) + eps / V),  p_s = exp(z_s - lse_s)
    D_s  = dz_s * (1 - (z_s / softcap)^2)   (dz_s without softcap; 0 on ignored rows)
    G_c  = sum_{s >= c} D_s     (only the scales that include chain c)
    dh[:, chain c] = G_c @ W[:, chain c]          dW[:, chain c] = G_c^T @ h[:, chain c]

Kernels (every GEMM is ``mma``: ``tl.dot`` in the input dtype, fp32 accumulation, wgmma on
sm_90a for 16-bit inputs; no torch matmul anywhere):
- ``_mcce_fwd_kernel`` (``triton_fwd``): grid (BLOCK_M row block, vocabulary split). Each program
  walks the BLOCK_N vocab tiles of its split; per tile ONE K loop runs over every chain's BLOCK_K
  tiles (no K tile straddles a chain) into an fp32 tile, and at each chain end (an ``if`` in the
  loop) the tile holds ``x_s``: its max and sum of exp (and, with label smoothing, sum of logits)
  fold into scale s's online state, a tuple of ``(BLOCK_M,)`` vectors per quantity. It writes the
  partials ``(2 or 3, N, NS, splits)``. ``_vocab_splits`` picks the splits from the SM count so
  that few rows still fill the GPU: 4096 tokens are 32 row blocks of 128, times 4 splits = 128
  programs for V 32000 on 132 SMs.
- ``_mcce_fwd_merge_kernel``: per BLOCK_R rows merges the splits in a fixed order
  (deterministic), gathers each row's target logits (a dot with the target's head row, prefix
  sums per scale), writes ``lse (N, NS)`` and the per-row outputs ``(2, NS, N)``; the launcher sums
  rows for ``mean``/``sum`` (no atomics).
- ``_mcce_bwd_dlogits_kernel`` (``triton_bwd``): grid (row tile of a row chunk, vocab tile):
  rebuilds ``x_s`` with the same one-K-loop structure from the saved ``lse`` (no logsumexp pass
  again), writes each ``D_s`` in the input dtype to slot s of a ``(NS, rows, V)`` workspace, then
  turns the slots into suffix sums ``G_c`` in place (fp32 running sum from the last scale down).
- ``_mcce_bwd_dh_kernel``: tiles (row tile, BLOCK_N columns of one chain), K loop over V:
  ``dh[:, chain c] = G_c @ W[:, chain c]``; no tile straddles a chain.
- ``_mcce_bwd_dw_kernel``: tiles (vocab tile, BLOCK_N columns of one chain), K loop over the
  chunk's rows: ``dW[:, chain c] (+)= G_c^T @ h[:, chain c]``. Over several chunks the sum is kept
  in an fp32 buffer and the last chunk writes the input dtype (chunks run in order: deterministic).

Per-row scales (``row_chains``, ``ROWS`` constexpr; row r counts in scales ``0..row_chains[r]``
only): the launchers sort the rows by decreasing scale (``colm_kernels._triton.rows.row_plan``:
``ORDER``, and ``COUNTS[c]`` the rows that reach scale c, a prefix of that order). Every row index
of the kernels above is then a position in that order: ``hidden``'s, ``dh``'s and the merge's
per-row reads and writes go through ``ORDER``; the forward partials and ``G`` are by position, and
the backward gathers targets, ``lse`` and per-row weights into that order first. A row block's
first row has its largest scale, so the logit kernels' K loop stops at that scale's prefix width
(no product of a chain no row of the block reaches); the merge zeroes each row's outputs (and
``lse``) at the scales it does not reach (position p reaches s iff p < COUNTS[s]); the dlogits
kernel masks ``D_s`` per row by ``COUNTS[s]`` (so ``G_c`` is 0 where a row stops before c) and
writes only the slots up to the block's largest scale; dh tiles of a chain past its count run no
K loop (exact zero columns) and mask ``G_c``'s rows past it; dW's K loop over rows stops at the
chain's count. ``mean`` divides each scale by its own count of rows (not ignored, reaching it).
A mixed batch so executes at most the tensor-core FLOPs of one batch per scale (counted in
tests/ops/test_multi_chain_cross_entropy_rows.py). A row's hidden columns past its own prefix
width reach only values that are masked, so they may hold anything.

FLOPs: the forward runs one ``(N, V, P)`` product, the backward three (logits again, dh, dW):
4 against the 3 of a backward that would keep logits, for ``O(N x NS)`` saved bytes instead of
``O(N x V x NS)``. When the upstream gradient is one scalar (``weights=``, or one scale) the fused
path of ``triton_fused`` runs 3: the forward keeps each chunk's logits and runs dh and dW itself.
Rows are chunked so the workspace stays under ``triton_bwd._WORKSPACE_BYTES``
(NS x rows x V elements of the input dtype, 1 GiB: N 4096, V 32000, NS 4 in bf16 is one chunk),
or twice the fp32 dW accumulator when dW needs several chunks (``triton_bwd.chunk_rows``).
The workspace is scaled by ``alpha = max |a|, |b|`` (multiplied back in the GEMM epilogues), so
fp16 keeps its relative precision for small upstream gradients.

Saved for backward: ``hidden``, ``weight``, ``targets`` and ``lse (N, NS)`` fp32 (and the per-row
scales, an input), nothing else; the backward sorts the rows again (no host sync).

Targets: a target outside ``[0, V)`` that is not ignore_index is never used as an address (the
gather reads row 0 under a false mask, the dlogits kernel compares column indices): its row's
``lse`` is NaN at the scales it reaches, so its losses there and its gradient rows are NaN (and so
are those reduced losses and dW).

Dtypes: fp16, bf16 (GPU only: the interpreter's bf16 ``tl.dot`` is wrong) or fp32 inputs (IEEE
dots); softmax math is fp32, losses and ``lse`` fp32, gradients written once in the input dtype.
Row offsets are int64; V and D must stay below 2**31. Autotune keys: the vocabulary, the chain
layout, the options and ``ROWS``, never N. Configs and their measured register limits: ``triton_tiles``.

This module gathers the launchers; the op is registered in ``triton_backend.py``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

from .triton_bwd import mcce_bwd
from .triton_fwd import mcce_fwd
from .triton_tiles import REDUCTIONS

__all__ = ["mcce_out_shape", "mcce_fwd", "mcce_bwd", "REDUCTIONS"]


def mcce_out_shape(offsets: Sequence[int], n_rows: int, reduction: str) -> Tuple[int, ...]:
    """The op's output shape: ``(2, NS)``, or ``(2, NS, N)`` for ``none`` (the fakes use it)."""
    ns = len(offsets) - 1
    return (2, ns, n_rows) if reduction == "none" else (2, ns)
