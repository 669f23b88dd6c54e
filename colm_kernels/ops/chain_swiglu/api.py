"""``chain_swiglu``: the SwiGLU gate of a Chain-of-Model FFN, ``silu(x W1^T) * (x W3^T)``, the
public function.

``W1`` and ``W3`` are Chain-of-Linear weights with the same block layout (COLM_SPEC sections 2, 3):
chain i's blocks ``W1_i``, ``W3_i`` have shape ``(d_i, P_i)`` (its hidden rows, every input column
it may read). Each is given like ``chain_linear``'s weight: the per-chain list (the paper's
``mlps.{i}.weight``, what ``ChainFeedForward.w1`` / ``.w3`` hold) or one dense ``(hidden, dim)``
matrix whose upper blocks are never read (and get zero gradient).
"""
from __future__ import annotations


from torch import Tensor

from ... import backends
from ...chains import ChainsLike, as_chains
from .._checks import check_like, check_tensor
from .._library import register_reference_op
from .._rows import row_chains as _row_chains
from ..autocast import LOWER, autocast_op
from ..chain_linear.api import as_rows, split_weight, unit_stride
from . import reference

OP = "chain_swiglu"
SCHEMA = "(Tensor x, Tensor[] w1, Tensor[] w3, Tensor? row_chains) -> Tensor"


def _fake(x, w1, w3, row_chains):
    return x.new_empty(reference.chain_swiglu_out_shape(x, w1))


chain_swiglu_reference = register_reference_op(f"{OP}_reference", reference.chain_swiglu, _fake, SCHEMA)

backends.register(OP, "reference", __name__, "chain_swiglu_reference")
backends.register(OP, "triton", "colm_kernels.ops.chain_swiglu.triton_backend", "chain_swiglu_triton",
                  reasons_fn="not_supported_reasons")


@autocast_op(LOWER, ("x", "w1", "w3"))
def chain_swiglu(x: Tensor, w1, w3, chains: ChainsLike, chain=None, *, seq_chains=None,
                 check_values: bool = True) -> Tensor:
    """``h_i = silu(x[..., :P_i] @ W1_i^T) * (x[..., :P_i] @ W3_i^T)`` for the active chains ``0..chain``.

    Args:
        x: ``(..., K)`` with ``K >= P_(chain+1)`` (wider inputs are sliced, as in the paper).
        w1, w3: each a dense ``(hidden, dim)`` Tensor (lower blocks read) or a list of per-chain
            blocks of shape ``(d_i, P_i)``; both must have the same layout, dtype and device.
        chains: the chain configuration; ``chain``: last active chain (None: all).
        seq_chains, check_values: per-row scales, as in ``chain_linear``: hidden features beyond
            a row's scale are exact zeros and pass no gradient.

    Returns ``(..., P_(chain+1)_hidden)``: the first active-width hidden features, in x's dtype.
    """
    check_tensor("x", x, min_ndim=1)
    chains = as_chains(chains)
    w1s, _ = split_weight(w1, None, chains, chain, name="w1")
    w3s, _ = split_weight(w3, None, chains, chain, name="w3")
    if [tuple(w.shape) for w in w1s] != [tuple(w.shape) for w in w3s]:
        raise ValueError(
            f"w1 and w3 layouts differ: w1 blocks {[tuple(w.shape) for w in w1s]}, "
            f"w3 blocks {[tuple(w.shape) for w in w3s]} (both must be (hidden, dim) blocks for "
            f"chains={chains.sizes})"
        )
    check_like("w1", w1s[0], w3=w3s[0])
    check_like("x", x, w1=w1s[0])
    rows = _row_chains(seq_chains, x, len(w1s) - 1, check_values)
    x2 = as_rows(x, w1s[-1].shape[1])
    w1s, w3s = unit_stride(w1s), unit_stride(w3s)
    tensors = [x2, *w1s, *w3s] + ([rows] if rows is not None else [])
    op = backends.dispatch(OP, tensors, x=x2, w1=w1s, w3=w3s, row_chains=rows)
    h = op(x2, w1s, w3s, rows)
    return h.reshape(*x.shape[:-1], h.shape[-1])
