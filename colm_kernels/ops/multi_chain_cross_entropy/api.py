"""``multi_chain_cross_entropy``: the cross-entropy at every scale, the public function."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ... import backends
from ...chains import ChainsLike, as_chains
from .._checks import check_like, check_tensor, unit_last_dim
from .._library import register_reference_op
from .._rows import row_chains as _row_chains
from ..autocast import FP32, autocast_op
from . import reference

OP = "multi_chain_cross_entropy"
SCHEMA = ("(Tensor hidden, Tensor weight, Tensor targets, int[] offsets, int ignore_index, "
          "str reduction=\"mean\", float label_smoothing=0.0, float lse_square_scale=0.0, "
          "float softcap=0.0, Tensor? row_chains=None, Tensor? weights=None) -> Tensor")


def _fake(hidden, weight, targets, offsets, ignore_index, reduction="mean", label_smoothing=0.0,
          lse_square_scale=0.0, softcap=0.0, row_chains=None, weights=None):
    shape = reference.out_shape(len(offsets) - 1, hidden.shape[0], reduction, weights is not None)
    return hidden.new_empty(shape, dtype=reference.loss_dtype(hidden.dtype))


multi_chain_cross_entropy_reference = register_reference_op(
    f"{OP}_reference", reference.multi_chain_cross_entropy, _fake, SCHEMA
)
backends.register(OP, "reference", __name__, "multi_chain_cross_entropy_reference")
backends.register(OP, "triton", "colm_kernels.ops.multi_chain_cross_entropy.triton_backend",
                  "multi_chain_cross_entropy_triton", reasons_fn="not_supported_reasons")


def _real(name: str, value, *, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < lo or (lo_open and value == lo) or value > hi:
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be a finite float in {left}{lo}, {hi}], got {value!r}")
    return value


def _scale_weights(weights, n_scales: int, device, dtype, check_values: bool) -> Tensor:
    """``weights`` (a sequence of real numbers or a 1-D real tensor, one per scale) as a tensor;
    a tensor is checked for finite values only with ``check_values`` (a host sync), a sequence
    always (no sync)."""
    if isinstance(weights, Tensor):
        if weights.dim() != 1 or weights.dtype == torch.bool or weights.is_complex():
            raise TypeError(f"weights must be a 1-D real tensor, got {weights.dtype} of shape {tuple(weights.shape)}")
        if weights.shape[0] != n_scales:
            raise ValueError(f"weights must hold one weight per scale ({n_scales}), got {weights.shape[0]}")
        if check_values and not torch.compiler.is_compiling() and not bool(torch.isfinite(weights).all()):
            raise ValueError(f"weights must be finite, got {weights.tolist()}")
        return weights.to(device=device, dtype=dtype)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights must be a sequence of floats or a 1-D tensor, got {weights!r}")
    values = list(weights)
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in values):
        raise TypeError(f"weights must hold real numbers, got {values!r}")
    if len(values) != n_scales:
        raise ValueError(f"weights must hold one weight per scale ({n_scales}), got {len(values)}: {values!r}")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"weights must be finite, got {values!r}")
    return torch.tensor(values, dtype=dtype, device=device)


@autocast_op(FP32, ("hidden", "weight"))
def multi_chain_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chains: ChainsLike, ignore_index: int = -100,
    *, reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
    softcap: Optional[float] = None, return_z_loss: bool = False, seq_chains: Optional[Tensor] = None,
    check_values: bool = True, weights: Union[Sequence[float], Tensor, None] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Cross-entropy of the output head at every scale, without the caller building logits.

    Scale ``s`` reads the first ``P_(s+1)`` columns of ``hidden`` and ``weight``:
    ``logits_s = hidden[..., :P_(s+1)] @ weight[:, :P_(s+1)]^T`` (never materialised by the kernel
    backends), and its loss is ``F.cross_entropy(logits_s, targets, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)`` plus the z-loss.

    Args:
        hidden: ``(..., W)`` final hidden states; ``W`` is a prefix width ``P_(k+1)`` of ``D``
            (``D`` itself for all scales), which selects scales ``0..k``.
        weight: output head ``(V, D)``; any layout (a last dim that is not unit-stride, such as a
            ``W.T`` view, is copied first).
        targets: integer ``(...)`` matching ``hidden``'s leading dims; ``ignore_index`` entries
            count in no loss and get zero gradients.
        reduction: ``"mean"`` (over the rows that are not ignored), ``"sum"`` or ``"none"``.
        label_smoothing: PyTorch's: ``(1 - eps) * nll + eps * mean_v(lse - logit_v)`` per row,
            in ``[0, 1]``; ignored rows stay out of both terms and of the mean's count.
        lse_square_scale: z-loss ``scale * logsumexp(logits_s)^2`` per row (>= 0), reduced like
            the loss and added to it.
        softcap: ``None`` or a positive float: each scale's logits become
            ``softcap * tanh(logits_s / softcap)`` before the softmax (and the z-loss).
        return_z_loss: also return the z-loss alone (already included in the loss).
        seq_chains: elastic batches (many scales in one batch): an integer tensor whose shape is a
            prefix of ``targets``' shape (``(B,)`` one scale per sequence, or the whole shape one
            per token), the last scale each row takes part in, at most ``k``. Row r with scale
            ``s`` counts in the losses of scales ``0..s`` only: each scale's loss (every option
            above as without it) is over the rows that reach it, so ``mean`` divides by the number
            of rows that reach it and are not ignored (NaN with zero gradients when there are
            none, as when every target is ignored), and ``none`` gives 0 where a row does not
            reach a scale, as at an ignored row. Scales a row does not reach pass it no gradient,
            and its hidden columns beyond its own prefix width ``P_(s+1)`` are never read (their
            gradient is an exact 0). The kernel backends skip the logit and gradient products of
            those scales (rows sorted by scale, see ``triton_kernels``).
        check_values: check on the host (one sync) that every target is a class index or
            ``ignore_index`` and every ``seq_chains`` value is in ``[0, k]``. With ``False`` (no
            sync; the models use it) an out-of-range target is never read past the vocabulary:
            its row's loss is NaN at every scale it reaches, so those reduced scale losses are NaN
            and the row's gradients are NaN; a ``seq_chains`` value below 0 takes the row out of
            every scale, one above ``k`` keeps it in all.
        weights: one real weight per scale ``0..k`` (a sequence or a 1-D tensor; ``mean`` or
            ``sum`` only): return the scalar ``sum_s weights[s] * loss_s`` (and with
            ``return_z_loss`` the same sum of the z-losses). When the loss needs gradients for
            ``hidden`` or ``weight`` (not for a ``weights`` tensor, and without ``return_z_loss``),
            the kernel backends compute them in the forward (3 logit-sized GEMMs in all instead of
            4) and keep only them for the backward, which scales them by the upstream gradient.
            A single scale (``k = 0``, reduced, no ``return_z_loss``) takes that path by itself.

    Returns the losses, float32 (float64 for float64 input): a scalar with ``weights``, ``(k+1,)``
    one per scale, or
    ``(k+1, *targets.shape)`` for ``reduction="none"`` (0 at ignored rows and at the scales a row
    does not reach); with
    ``return_z_loss`` a pair ``(loss, z_loss)`` of that shape. When every target is ignored,
    ``mean`` gives NaN losses with zero gradients and ``sum`` zeros, as ``F.cross_entropy``.
    """
    chains = as_chains(chains)
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("targets", targets, kind="int")
    check_like("hidden", hidden, weight=weight)
    check_like("hidden", hidden, dtype=False, targets=targets)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    label_smoothing = _real("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    lse_square_scale = _real("lse_square_scale", lse_square_scale, lo=0.0)
    cap = 0.0 if softcap is None else _real("softcap", softcap, lo=0.0, lo_open=True)
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss must be a bool, got {return_z_loss!r}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (class), got shape {tuple(weight.shape)}")
    dim = weight.shape[1]
    offsets = chains.offsets(dim, name="weight.shape[1]")
    k = chains.scale_of_width(hidden.shape[-1], dim, name="hidden.shape[-1]")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
            f"got {tuple(targets.shape)}"
        )
    offsets = list(offsets[: k + 2])
    rows = _row_chains(seq_chains, hidden, k, check_values, x_name="hidden")
    h2 = unit_last_dim(hidden.reshape(-1, hidden.shape[-1]))
    weight = unit_last_dim(weight)
    t1 = targets.reshape(-1).long()  # any integer dtype in; every backend reads int64
    if check_values and not torch.compiler.is_compiling() and t1.numel():
        # One host sync per call: an out-of-range target would be a device-side assert on GPU.
        bad = (t1 != ignore_index) & ((t1 < 0) | (t1 >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"targets must be in [0, {weight.shape[0]}) (weight.shape[0] classes) or "
                f"ignore_index={ignore_index}, got {t1[bad][:5].tolist()}"
            )
    n_scales = len(offsets) - 1
    weighted = weights is not None
    if weighted:
        if reduction == "none":
            raise ValueError("weights needs a reduced loss: reduction 'mean' or 'sum', got 'none'")
        weights = _scale_weights(weights, n_scales, hidden.device, reference.loss_dtype(hidden.dtype),
                                 check_values)
    elif n_scales == 1 and reduction != "none" and not return_z_loss:
        # one scale: its loss is known up to the upstream scalar, so the fused path applies
        weights = torch.ones(1, dtype=reference.loss_dtype(hidden.dtype), device=hidden.device)
    fuse = weights is not None and not return_z_loss
    options = dict(reduction=reduction, label_smoothing=label_smoothing,
                   lse_square_scale=lse_square_scale, softcap=cap, row_chains=rows)
    tensors = [h2, weight, t1] + ([rows] if rows is not None else [])
    op = backends.dispatch(OP, tensors, hidden=h2, weight=weight, targets=t1,
                           offsets=offsets, ignore_index=ignore_index, **options)
    if fuse:  # (2,): the weighted loss and z-loss
        out = op(h2, weight, t1, offsets, ignore_index, **options, weights=weights)
        return out[0] if weighted else out[:1]
    out = op(h2, weight, t1, offsets, ignore_index, **options)
    if weighted:  # with return_z_loss: the per-scale path, weighted here (the z-loss gets gradients)
        out = (out * weights.to(out.dtype)).sum(-1)
        return out[0], out[1]
    if reduction == "none":
        out = out.reshape(2, len(offsets) - 1, *targets.shape)
    return (out[0], out[1]) if return_z_loss else out[0]
