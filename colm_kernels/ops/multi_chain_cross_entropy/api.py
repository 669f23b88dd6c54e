"""``multi_chain_cross_entropy``: the mean cross-entropy at every scale, the public function."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import backends
from ...chains import ChainsLike, as_chains
from .._checks import check_like, check_tensor
from .._library import register_reference_op
from . import reference

OP = "multi_chain_cross_entropy"
SCHEMA = "(Tensor hidden, Tensor weight, Tensor targets, int[] offsets, int ignore_index) -> Tensor"


def _fake(hidden, weight, targets, offsets, ignore_index):
    return hidden.new_empty((len(offsets) - 1,), dtype=reference.loss_dtype(hidden.dtype))


multi_chain_cross_entropy_reference = register_reference_op(
    f"{OP}_reference", reference.multi_chain_cross_entropy, _fake, SCHEMA
)
backends.register(OP, "reference", __name__, "multi_chain_cross_entropy_reference")
backends.register(OP, "triton", "colm_kernels.ops.multi_chain_cross_entropy.triton",
                  "multi_chain_cross_entropy_triton", reasons_fn="not_supported_reasons")


def multi_chain_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chains: ChainsLike, ignore_index: int = -100,
    *, check_values: bool = True,
) -> Tensor:
    """Mean cross-entropy of the output head at every scale, without the caller building logits.

    Args:
        hidden: ``(..., W)`` final hidden states; ``W`` is a prefix width ``P_(k+1)`` of ``D``
            (``D`` itself for all scales), which selects scales ``0..k``.
        weight: output head ``(V, D)``; scale j uses its first ``P_(j+1)`` columns.
        targets: integer ``(...)`` matching ``hidden``'s leading dims; ``ignore_index`` entries
            are excluded from every mean.
        check_values: check on the host (one sync) that every target is a class index or
            ``ignore_index``.

    Returns a 1-D tensor: the loss at each scale ``0..k`` (float32, or float64 for float64 input).
    """
    chains = as_chains(chains)
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("targets", targets, kind="int")
    check_like("hidden", hidden, weight=weight)
    check_like("hidden", hidden, dtype=False, targets=targets)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    dim = weight.shape[1]
    offsets = chains.offsets(dim, name="weight.shape[1]")
    k = chains.scale_of_width(hidden.shape[-1], dim, name="hidden.shape[-1]")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
            f"got {tuple(targets.shape)}"
        )
    offsets = list(offsets[: k + 2])
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).long()  # any integer dtype in; every backend reads int64
    if check_values and not torch.compiler.is_compiling() and t1.numel():
        # One host sync per call: an out-of-range target would be a device-side assert on GPU.
        bad = (t1 != ignore_index) & ((t1 < 0) | (t1 >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"targets must be in [0, {weight.shape[0]}) (weight.shape[0] classes) or "
                f"ignore_index={ignore_index}, got {t1[bad][:5].tolist()}"
            )
    op = backends.dispatch(OP, [h2, weight, t1], hidden=h2, weight=weight, targets=t1,
                           offsets=offsets, ignore_index=ignore_index)
    return op(h2, weight, t1, offsets, ignore_index)
