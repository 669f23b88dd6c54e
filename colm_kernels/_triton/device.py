"""Where Triton kernels run and which tensors they accept (host side).

- ``is_interpreter`` / ``small_tiles``: kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``)
  and whether they take its small tiles (unless ``COLM_KERNELS_TILES=gpu`` asks for the H100 ones).
- ``TORCH_TO_TL`` / ``FLOAT_DTYPES`` / ``tl_dtype``: the floating dtypes kernels take.
- ``device_guard``: make a tensor's CUDA device current around a launch.
- ``check_tensor``: a launcher's argument check, errors naming the argument (the public ops in
  ``ops/<op>/api.py`` check user input; launchers check what tests or other ops hand them).
- ``is_pow2_in`` / ``last_dim_contiguous``; ``interpreter_dtype_reasons`` (bf16 ``tl.dot`` is wrong
  in the interpreter) and ``attention_input_reasons`` (dtype and head dim of attention kernels).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional

import torch
import triton.language as tl

__all__ = ["is_interpreter", "small_tiles", "TORCH_TO_TL", "FLOAT_DTYPES", "tl_dtype", "device_guard",
           "check_tensor", "is_pow2_in", "last_dim_contiguous", "interpreter_dtype_reasons",
           "attention_input_reasons"]


def is_interpreter() -> bool:
    """True when Triton kernels run in the numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def small_tiles() -> bool:
    """True when kernels use their small interpreter tiles and configs: under the interpreter,
    unless ``COLM_KERNELS_TILES=gpu`` (read at import, like ``TRITON_INTERPRET``) asks for the H100
    tiles there, so that the work accounting (``colm_kernels.bench.work``) counts what a GPU run
    executes."""
    return is_interpreter() and os.environ.get("COLM_KERNELS_TILES", "").strip().lower() != "gpu"


TORCH_TO_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}
FLOAT_DTYPES = tuple(TORCH_TO_TL)


def tl_dtype(dtype: torch.dtype):
    """The Triton type of a supported torch floating dtype; ``TypeError`` otherwise."""
    try:
        return TORCH_TO_TL[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype}: expected one of {FLOAT_DTYPES}") from None


def device_guard(device: torch.device):
    """Make ``device`` current while launching (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, last_dim_contiguous: bool = True) -> torch.Tensor:
    """Validate one kernel argument; raise ``TypeError``/``ValueError`` naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the other inputs are {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if last_dim_contiguous and t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}"
        )
    return t



def is_pow2_in(n: int, lo: int, hi: int) -> bool:
    """``n`` is a power of two with ``lo <= n <= hi`` (head dims, block sizes)."""
    return isinstance(n, int) and lo <= n <= hi and n & (n - 1) == 0


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has a unit stride (or at most one element), else a
    contiguous copy: what kernels that read rows with any other strides need."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def interpreter_dtype_reasons(dtype: torch.dtype) -> List[str]:
    """Why the Triton interpreter cannot run a kernel with ``tl.dot`` on ``dtype`` inputs (empty:
    it can, or kernels run on a GPU): it computes bfloat16 dots wrongly."""
    if is_interpreter() and dtype == torch.bfloat16:
        return ["the Triton interpreter computes bfloat16 tl.dot wrongly: bfloat16 needs a GPU"]
    return []


def attention_input_reasons(op: str, q: torch.Tensor, min_head_dim: int, max_head_dim: int, *,
                            head_dim_reasons: Optional[Callable[[int], List[str]]] = None) -> List[str]:
    """Why a Triton attention kernel cannot take ``q``: its dtype (fp16 / bf16 / fp32, and what the
    interpreter cannot run) or its head dim (a power of two in ``[min_head_dim, max_head_dim]``,
    or the kernel's own rule ``head_dim_reasons(d)`` when given)."""
    reasons = []
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"triton {op} supports float16/bfloat16/float32, got {q.dtype}")
    reasons += interpreter_dtype_reasons(q.dtype)
    d = int(q.shape[-1])
    if head_dim_reasons is not None:
        reasons += head_dim_reasons(d)
    elif not is_pow2_in(d, min_head_dim, max_head_dim):
        reasons.append(f"head dim must be a power of two in [{min_head_dim}, {max_head_dim}], got {d}")
    return reasons
