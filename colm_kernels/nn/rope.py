"""Rotary position embedding, interleaved pairs (features 2t, 2t+1), TorchTitan/Meta convention."""
from __future__ import annotations

import torch
from torch import Tensor


def rope_angles(head_dim: int, start: int, length: int, theta: float, device) -> Tensor:
    """``(length, head_dim // 2)`` angles ``pos * theta^(-2t / head_dim)``, in float64."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
    return pos[:, None] * inv_freq[None, :]


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, S, H, hd)`` by ``angles`` ``(S, hd // 2)``; math in float32 (float64 for
    float64 input), result in ``x``'s dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos = angles.cos().to(compute)[None, :, None, :]
    sin = angles.sin().to(compute)[None, :, None, :]
    even, odd = x.to(compute).unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
