"""Per-chain RMSNorm: thin launchers over the CUDA extension (``csrc/chain_rmsnorm``).

Math (COLM_SPEC.md section 3), per row and chain segment ``s = [o_s, o_{s+1})`` of width ``w_s``,
all in fp32, outputs rounded once to the input dtype:

    rstd[r, s] = 1 / sqrt(sum(x[r, s]^2) / w_s + eps)
    y[r, c]    = x[r, c] * rstd[r, s] * weight[c]
    backward:  xhat = x * rstd,  dxhat = dy * weight,  m = mean_s(dxhat * xhat)
    dx         = rstd * (dxhat - xhat * m),   dweight = sum over rows of dy * xhat

Contracts (all tensors on one CUDA device; float32, float16 or bfloat16, one dtype for all but
``rstd``):

- ``x2d``, ``dy``: ``(M, W)``; any row stride (inputs not contiguous along ``W`` are copied).
- ``weight``: ``(W,)``; ``offsets``: ints ``[0, o_1, ..., o_n = W]`` strictly increasing,
  ``1 <= n <= MAX_CHAINS`` (a ``Chains``-derived tuple or list of prefix widths).
- returns ``y (M, W)`` contiguous and ``rstd (M, n)`` float32 contiguous (what backward needs);
  backward returns ``dx (M, W)`` contiguous and ``dweight (W,)`` in ``weight.dtype``, summed in
  a fixed order (run-to-run deterministic on a given GPU).

The ``*_fake`` functions give the same output shapes for ``register_fake``. The extension is
loaded on first call; ``RuntimeError`` with the reason when it cannot be used.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..._cuda import require_extension

MAX_CHAINS = 64


def _offsets_list(offsets: Sequence[int]) -> list[int]:
    return [int(o) for o in offsets]


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.dim() >= 1 and t.size(-1) > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def chain_rmsnorm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor, offsets: Sequence[int], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` for ``x2d (M, W)``, ``weight (W,)``, chain ``offsets`` and ``eps``."""
    ext = require_extension()
    y, rstd = ext.chain_rmsnorm_fwd(
        _last_dim_contiguous(x2d), _last_dim_contiguous(weight), _offsets_list(offsets), float(eps)
    )
    return y, rstd


def chain_rmsnorm_bwd(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offsets: Sequence[int],
    needs_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` from ``dy (M, W)``, the forward's ``x2d``, ``weight`` and ``rstd (M, n)``;
    without ``needs_weight`` (a frozen gain) ``dweight`` is an empty ``(0,)`` tensor and the
    kernels do no dweight work."""
    ext = require_extension()
    dx, dweight = ext.chain_rmsnorm_bwd(
        _last_dim_contiguous(dy),
        _last_dim_contiguous(x2d),
        _last_dim_contiguous(weight),
        rstd.contiguous(),
        _offsets_list(offsets),
        bool(needs_weight),
    )
    return dx, dweight


def chain_rmsnorm_fwd_fake(
    x2d: torch.Tensor, weight: torch.Tensor, offsets: Sequence[int], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``chain_rmsnorm_fwd`` with the right shapes and dtypes, no data."""
    m, w = x2d.shape
    n = len(offsets) - 1
    return x2d.new_empty((m, w)), x2d.new_empty((m, n), dtype=torch.float32)


def chain_rmsnorm_bwd_fake(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offsets: Sequence[int],
    needs_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``chain_rmsnorm_bwd`` with the right shapes and dtypes, no data."""
    m, w = x2d.shape
    return x2d.new_empty((m, w)), weight.new_empty((w if needs_weight else 0,))
