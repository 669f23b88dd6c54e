"""Input checks shared by every op's public function (each error names the argument), and the
layout normalisation the kernel backends rely on."""
from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None,
                 kind: str = "float") -> Tensor:
    """``kind``: ``float`` (floating point) or ``int`` (integer dtype)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if kind == "float" and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def check_like(ref_name: str, ref: Tensor, *, dtype: bool = True, **others: Tensor) -> None:
    """Every tensor in ``others`` is on ``ref``'s device (and has its dtype)."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if dtype and t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def check_dim(name: str, got: int, expected: int, what: str) -> None:
    if got != expected:
        raise ValueError(f"{name} must be {expected} ({what}), got {got}")


def check_int_values(name: str, t: Tensor, lo: int, hi: int, what: str = "") -> None:
    """Every value of the integer tensor ``t`` is in ``[lo, hi]``: one host sync, skipped while
    compiling or capturing a CUDA graph (data-dependent checks cannot run there)."""
    if torch.compiler.is_compiling() or not t.numel():
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    a, b = (int(x) for x in torch.stack([t.min(), t.max()]).tolist())
    if a < lo or b > hi:
        what = f" ({what})" if what else ""
        raise ValueError(f"{name} values must be in [{lo}, {hi}]{what}, got values in [{a}, {b}]")


def check_seq_chains(seq_chains, q: Tensor, n_seq: int, scale: int, check_values: bool) -> None:
    """``seq_chains``: None, or an integer ``(n_seq,)`` tensor on ``q``'s device with values in
    ``[0, scale]`` (values checked on the host only with ``check_values``)."""
    if seq_chains is None:
        return
    check_tensor("seq_chains", seq_chains, ndim=1, kind="int")
    check_like("q", q, dtype=False, seq_chains=seq_chains)
    if seq_chains.shape[0] != n_seq:
        raise ValueError(f"seq_chains must have one entry per sequence ({n_seq}), got {seq_chains.shape[0]}")
    if check_values:
        check_int_values("seq_chains", seq_chains, 0, scale)


def softmax_scale_or_default(softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` as a float: ``head_dim ** -0.5`` when None (``head_dim`` must then be
    positive), else a positive finite number."""
    if softmax_scale is None:
        if head_dim <= 0:
            raise ValueError(f"head dim q.shape[-1]={head_dim}: the default softmax_scale = head_dim ** -0.5 "
                             "needs a positive head dim (or pass softmax_scale)")
        return head_dim ** -0.5
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
            or not 0 < softmax_scale < float("inf")):
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def dense(t: Tensor) -> Tensor:
    """``t.contiguous()``, except that a zero-element tensor (which ``contiguous()`` returns with its
    strides unchanged: PyTorch calls it contiguous) becomes a fresh zero tensor of its shape."""
    return t.contiguous() if t.numel() else t.new_zeros(t.shape)


def unit_last_dim(t: Tensor) -> Tensor:
    """``t`` when its last dim has a unit stride (or at most one element), else ``dense(t)``: the
    layout every kernel backend reads rows in, so no input is accepted by one backend and refused
    by another."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else dense(t)
