"""The Tensor Memory Accelerator (TMA, sm_90+): which launches may fetch tiles by TMA descriptors.

- ``tma_mode``: which of the pointer / TMA configs the pruners offer (tests force either);
  ``tma_choices``: the ``USE_TMA`` values offered for one launch; ``tma_legal`` (GEMM launches) and
  ``tma_device``: whether descriptors are legal there.
- ``operands_tma_aligned`` / ``strides_tma_aligned``: whether tensors can back descriptors.
- ``ensure_tma_allocator`` / ``tma_launch_guard``: the global scratch allocator device-side
  descriptors need on CUDA (the guard also makes the device current around a launch).
- ``tile_desc`` (``@triton.jit``): a descriptor of a row-major matrix (boxes past its edges read
  zeros).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .autotuning import clear_tuning_caches
from .device import device_guard, small_tiles

__all__ = ["tma_mode", "current_mode", "tma_legal", "tma_device", "tma_choices", "operands_tma_aligned",
           "strides_tma_aligned", "ensure_tma_allocator", "tma_launch_guard", "tile_desc"]


_TMA_MODES = ("auto", "off", "only")
_tma_mode = "auto"


@contextlib.contextmanager
def tma_mode(mode: str):
    """Which configs the pruners (GEMM and attention) offer inside the block: ``"auto"`` (the
    default: the pointer configs and, where descriptors are legal, their TMA twins, so the
    autotuner chooses; under the interpreter's small tiles the pointer config only), ``"off"``
    (pointer configs only) or ``"only"`` (the TMA configs wherever they are legal, the interpreter
    included; pointer configs where not): tests of either path. Tuning caches are cleared on entry
    and exit."""
    global _tma_mode
    if mode not in _TMA_MODES:
        raise ValueError(f"tma_mode must be one of {_TMA_MODES}, got {mode!r}")
    saved = _tma_mode
    clear_tuning_caches()
    _tma_mode = mode
    try:
        yield
    finally:
        _tma_mode = saved
        clear_tuning_caches()


def current_mode() -> str:
    """The ``tma_mode`` in force."""
    return _tma_mode


def tma_legal(args: Dict[str, object], element_size: int, device=None) -> bool:
    """Whether a GEMM launch with kernel arguments ``args`` may run a TMA config: 16-bit inputs
    (fp32 dots are IEEE FMA loops, not wgmma), an aligned table (``ALIGN > 1``: weight pointers,
    widths, offsets and row strides 16-byte multiples), activation operands that can back a
    descriptor (``TMA_OPERANDS``, see ``operands_tma_aligned``), no ``ROWS`` gather (TMA reads
    boxes, not rows through a pointer table) and, on CUDA, a GPU with TMA (sm_90 or newer)."""
    if element_size != 2 or int(args.get("ALIGN", 1)) <= 1 or not bool(args.get("TMA_OPERANDS", False)):
        return False
    if bool(args.get("ROWS", False)):
        return False
    return tma_device(device)


def tma_device(device=None) -> bool:
    """Whether launches on ``device`` may use TMA: on CUDA a GPU of sm_90 or newer; elsewhere (the
    interpreter, or the compile-only sm_90a driver of ``colm_kernels.bench.sm90``) True."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return True


def tma_choices(legal: bool) -> tuple:
    """The ``USE_TMA`` values a pruner offers for a launch whose descriptors are ``legal``, under
    the current ``tma_mode``: pointer configs always where TMA is illegal or off; TMA twins alone in
    ``"only"``; both in ``"auto"``, except under the interpreter's small tiles (pointer only)."""
    if not legal or _tma_mode == "off":
        return (False,)
    if _tma_mode == "only":
        return (True,)
    return (False,) if small_tiles() else (False, True)


def operands_tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every row-major 2-D operand can back a TMA descriptor: a 16-byte aligned base and
    row stride (in bytes), and fewer than 2**31 rows (descriptor extents are int32)."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.shape[0] < 2**31
               for t in tensors)


def strides_tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether descriptors over any 2-D slice ``t[i, ..., :, j, :]`` of these tensors (rows along
    one dim, the unit-stride last dim as columns) are legal: a 16-byte aligned base, every stride
    but the last's a 16-byte multiple (so every slice's base and row stride are too), a unit last
    stride, and every dim below 2**31 (descriptor extents are int32)."""
    return all(t.data_ptr() % 16 == 0 and (t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1)
               and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               and all(n < 2**31 for n in t.shape) for t in tensors)


def _torch_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    # the current device (launchers run under device_guard) and its current stream, like the launch
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator(device) -> None:
    """On CUDA, make sure Triton can allocate the global scratch that device-side TMA descriptors
    (``tile_desc``) are written to at launch: set a torch-backed allocator unless one is set. The
    allocator is a context variable (one per thread: autograd's backward thread gets its own), so
    launchers call this before each launch that may pick a TMA config; an allocator the caller set
    is kept."""
    if torch.device(device).type != "cuda":
        return
    try:
        from triton.runtime import _allocation
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # a Triton without the context variable: set ours
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)



@triton.jit
def tile_desc(base, rows, cols, row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A TMA descriptor of the row-major ``(rows, cols)`` matrix at ``base`` (row stride
    ``row_stride``, unit column stride), read in ``BLOCK_R x BLOCK_C`` boxes with ``.load([r, c])``.
    Legal (``tma_legal``) when ``base`` and the row stride in bytes are 16-byte multiples and box
    start columns are too. A box reaching past ``rows`` / ``cols`` reads zeros there, which replaces
    the masks: pass the extents the math may read, never more than the allocation holds."""
    return tl.make_tensor_descriptor(base, shape=[rows, cols], strides=[row_stride, 1],
                                     block_shape=[BLOCK_R, BLOCK_C])


@contextlib.contextmanager
def tma_launch_guard(device):
    """Around the launch of a kernel whose autotuner may pick a TMA config: Triton's scratch
    allocator set for the device-side descriptors (per thread: autograd's backward thread gets its
    own), and the tensors' CUDA device current."""
    ensure_tma_allocator(device)
    with device_guard(device):
        yield

