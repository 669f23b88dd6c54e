"""``chain_rmsnorm``: RMSNorm applied to each chain's segment separately, the public function."""
from __future__ import annotations

from torch import Tensor

from ... import backends
from ...chains import ChainsLike, as_chains
from .._checks import check_like, check_tensor, unit_last_dim
from .._library import register_reference_op
from .._rows import row_chains as _row_chains
from ..autocast import FP32, autocast_op
from . import reference

OP = "chain_rmsnorm"
SCHEMA = "(Tensor x, Tensor weight, int[] offsets, float eps, Tensor? row_chains) -> Tensor"

chain_rmsnorm_reference = register_reference_op(
    f"{OP}_reference", reference.chain_rmsnorm,
    lambda x, weight, offsets, eps, row_chains: x.new_empty(x.shape), SCHEMA,
)
backends.register(OP, "reference", __name__, "chain_rmsnorm_reference")
backends.register(OP, "cuda", "colm_kernels.ops.chain_rmsnorm.cuda_backend", "chain_rmsnorm_cuda",
                  reasons_fn="not_supported_reasons")
backends.register(OP, "triton", "colm_kernels.ops.chain_rmsnorm.triton_backend", "chain_rmsnorm_triton", reasons_fn="not_supported_reasons")
backends.register_bounds(OP, "colm_kernels.ops.chain_rmsnorm.bounds")


def save_for_backward(ctx, inputs, output) -> None:
    """``setup_context`` of the kernel backends' forward ops ``(x, weight, offsets, eps, row_chains)
    -> (y, rstd)``: the backward reads x, weight, the per-row scales and the saved per-row,
    per-chain ``rstd`` (never recomputed)."""
    x, weight, offsets, _, row_chains = inputs
    ctx.save_for_backward(x, weight, output[1], row_chains)
    ctx.offsets = offsets
    ctx.mark_non_differentiable(output[1])


@autocast_op(FP32, ("x", "weight"), output_like="x")
def chain_rmsnorm(x: Tensor, weight: Tensor, chains: ChainsLike, eps: float = 1e-5, chain=None, *,
                  seq_chains=None, check_values: bool = True) -> Tensor:
    """Per-chain RMSNorm of ``x`` (``(..., W)``) with gain ``weight`` (``(D,)``).

    ``W`` is the active width: ``P_(chain+1)`` of ``D`` split by ``chains``. With ``chain=None``
    the scale is read off ``W``, which must then be one of the prefix widths. ``seq_chains`` and
    ``check_values``: per-row scales, as in ``chain_linear``: segments beyond a row's scale are
    exact zeros and pass no gradient.
    """
    chains = as_chains(chains)
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=1)
    check_like("x", x, weight=weight)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    dim = weight.shape[0]
    offsets = chains.offsets(dim, name="weight.shape[0]")
    if chain is None:
        if x.shape[-1] > dim:  # a gain shorter than x: the gain is what is wrong
            raise ValueError(
                f"weight.shape[0]={dim} is shorter than x.shape[-1]={x.shape[-1]}: weight is the "
                f"gain of the full width D, of length {x.shape[-1]} for a full-width x (x's width "
                f"must be one of the prefix widths of D split by chains={chains.sizes})"
            )
        k = chains.scale_of_width(x.shape[-1], dim, dim_name="weight.shape[0]")
    else:
        k = chains.check_chain(chain)
        if x.shape[-1] != offsets[k + 1]:
            raise ValueError(
                f"x.shape[-1]={x.shape[-1]} must be the active width P_{k + 1}={offsets[k + 1]} "
                f"for chain={k}, chains={chains.sizes}, dim={dim}"
            )
    width = offsets[k + 1]
    rows = _row_chains(seq_chains, x, k, check_values)
    x2 = unit_last_dim(x.reshape(-1, width))
    w = unit_last_dim(weight[:width])
    offs = list(offsets[: k + 2])
    tensors = [x2, w] + ([rows] if rows is not None else [])
    op = backends.dispatch(OP, tensors, x=x2, weight=w, offsets=offs, eps=float(eps), row_chains=rows)
    return op(x2, w, offs, float(eps), rows).reshape(x.shape)
