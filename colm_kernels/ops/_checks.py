"""Input checks shared by every op's public function: each error names the argument."""
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
