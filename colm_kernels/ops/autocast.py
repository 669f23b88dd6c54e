"""``torch.autocast`` for the public ops: each casts its inputs as PyTorch casts its dense counterpart.

Under ``torch.autocast(device_type)`` (for the device the op's tensors are on):

- ``LOWER``: ``chain_linear``, ``chain_swiglu``, ``chain_attention``, ``chain_attention_decode``,
  like ``F.linear`` and ``F.scaled_dot_product_attention``: floating inputs go to the autocast dtype
  and the output is in it.
- ``FP32``: ``chain_rmsnorm`` and ``multi_chain_cross_entropy``, like ``F.layer_norm`` and
  ``F.cross_entropy``: inputs go to float32 and the op computes in it. The cross-entropy returns
  float32, as ``F.cross_entropy`` does under autocast on every device. ``F.layer_norm`` returns
  float32 under CUDA's autocast (its fp32 list) but its input's dtype under CPU's (not on CPU's
  lists); the norm returns the same.

float64 tensors are never cast (PyTorch's autocast leaves them alone too). The op then runs with
autocast off, so nothing inside it casts again. The casts are ordinary autograd ops, so an fp32
parameter used in a bf16 op receives an fp32 gradient. It is plain Python over
``torch.is_autocast_enabled`` and ``Tensor.to``: ``torch.compile`` traces it (``fullgraph=True``).
Unlike PyTorch's autocast, which caches the cast of a leaf parameter for the whole region, a
parameter is cast at every call (a training step uses each once; a decode loop under autocast casts
the weights at every step).

Autocast is decided on the public function, not by ``torch.library.register_autocast`` on the
registered ops: the public functions check that inputs share a dtype before any op is reached, and
``register_autocast`` casts to one fixed dtype, whatever the autocast region asks for.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

LOWER, FP32 = "lower", "fp32"
# Device types whose autocast leaves ``layer_norm`` in its input's dtype (PyTorch's CPU autocast
# lists do not name it; CUDA's runs it in float32).
_NORM_KEEPS_INPUT_DTYPE = frozenset({"cpu"})


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs lower-precision ops in on ``device_type``, None when it is off."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _castable(t: Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float64


def _cast(value, dtype: torch.dtype):
    """``value`` (a tensor, a list/tuple of tensors, or anything else) with its eligible tensors in ``dtype``."""
    if isinstance(value, Tensor):
        return value.to(dtype) if _castable(value) else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def autocast_op(policy: str, names: Iterable[str], *, output_like: Optional[str] = None) -> Callable:
    """Decorate a public op: under autocast its arguments ``names`` (the first one a tensor, whose
    device decides) are cast by ``policy`` (``LOWER`` or ``FP32``), then the op runs with
    autocast off. ``output_like``: an ``FP32`` op whose output takes that argument's original
    dtype where ``layer_norm`` keeps its input's dtype (CPU)."""
    if policy not in (LOWER, FP32):
        raise ValueError(f"policy must be {LOWER!r} or {FP32!r}, got {policy!r}")
    names = tuple(names)

    def decorate(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters)
        positions = {name: params.index(name) for name in names}

        def get(args, kwargs, name):
            i = positions[name]
            return args[i] if i < len(args) else kwargs.get(name)

        @functools.wraps(fn)
        def op(*args, **kwargs):
            first = get(args, kwargs, names[0])
            if not isinstance(first, Tensor):
                return fn(*args, **kwargs)  # the op's own checks say what is wrong
            device = first.device.type
            dtype = autocast_dtype(device)
            if dtype is None:
                return fn(*args, **kwargs)
            target = dtype if policy == LOWER else torch.float32
            like = get(args, kwargs, output_like) if output_like else None
            keep = like.dtype if isinstance(like, Tensor) and device in _NORM_KEEPS_INPUT_DTYPE else None
            args, kwargs = list(args), dict(kwargs)
            for name in names:
                i = positions[name]
                if i < len(args):
                    args[i] = _cast(args[i], target)
                elif name in kwargs:
                    kwargs[name] = _cast(kwargs[name], target)
            with torch.autocast(device, enabled=False):
                out = fn(*args, **kwargs)
            return out if keep is None else out.to(keep)

        return op

    return decorate


@contextlib.contextmanager
def autocast_off(tensors: Iterable) -> Iterator[None]:
    """Autocast off for the device types of ``tensors`` (a no-op where it is off already): plain
    PyTorch inside a registered op (the reference backend) computes in the dtypes it was given,
    also when autograd runs its backward inside an autocast region."""
    devices = {t.device.type for t in tensors if isinstance(t, Tensor)}
    with contextlib.ExitStack() as stack:
        for device in sorted(devices):
            if autocast_dtype(device) is not None:
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
