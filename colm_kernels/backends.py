"""Backend registry and selection.

Every op has implementations keyed by backend name (``reference``, ``triton``, ``cuda``). Each
implementation can say why it cannot run given inputs (``not_supported_reasons``). ``auto`` keeps the
backends that can, and among several picks by evidence: the lowest H100 roofline bound of what each
would execute (``auto_bounds``; an op's ``bounds`` module), or measured GPU timings where a table
has them; ties keep a fixed order. An explicitly named backend that cannot run the inputs raises
``BackendError`` listing the reasons: never a silent fallback. ``explain`` says why ``auto`` chose.

The active backend comes from ``set_backend``, the ``use_backend`` context manager, or the
environment variable ``COLM_KERNELS_BACKEND`` (read at import), in that order of precedence.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
from typing import Callable, Iterator, Sequence

import torch

from . import auto_bounds

BACKENDS = ("auto", "cuda", "triton", "reference")
# ``auto`` on CUDA tensors considers these (the order breaks ties between bounds); on CPU tensors
# only ``reference`` is fast enough to be worth picking (the Triton interpreter is a test tool,
# asked for explicitly).
_AUTO_ORDER_CUDA = ("cuda", "triton", "reference")
_AUTO_ORDER_CPU = ("reference",)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendError(RuntimeError):
    """A backend was asked for an op or inputs it cannot run."""


def _check_name(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_env_backend = os.environ.get("COLM_KERNELS_BACKEND", "auto") or "auto"
if _env_backend not in BACKENDS:
    raise ValueError(f"COLM_KERNELS_BACKEND must be one of {BACKENDS}, got {_env_backend!r}")
_current = _env_backend


_per_op: dict[str, str] = {}  # ops whose backend was set on its own


def set_backend(name: str, *, ops: Sequence[str] | None = None) -> None:
    """Select the backend (``auto``, ``cuda``, ``triton``, ``reference``) for every op, or only for
    the ops named in ``ops`` (the others keep theirs)."""
    global _current
    _check_name(name)
    if ops is None:
        _current = name
        _per_op.clear()
    else:
        for op in _check_ops(ops):
            _per_op[op] = name


def get_backend(op: str | None = None) -> str:
    """The backend selected for ``op`` (or for every op without its own)."""
    return _per_op.get(op, _current) if op is not None else _current


@contextlib.contextmanager
def use_backend(name: str, *, ops: Sequence[str] | None = None) -> Iterator[None]:
    """Run a block with another backend (for every op, or only ``ops``); restores on exit."""
    global _current
    saved = (_current, dict(_per_op))
    set_backend(name, ops=ops)
    try:
        yield
    finally:
        _current = saved[0]
        _per_op.clear()
        _per_op.update(saved[1])


def _check_ops(ops) -> list[str]:
    if isinstance(ops, str):
        ops = [ops]
    unknown = sorted(set(ops) - set(_REGISTRY))
    if unknown:
        raise ValueError(f"ops must name registered ops {sorted(_REGISTRY)}, got unknown {unknown}")
    return list(ops)


# -- availability of whole backends ---------------------------------------------------------
def triton_interpret() -> bool:
    """True when Triton kernels run in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason() -> str | None:
    # Never imports triton: it reads TRITON_INTERPRET when first imported, so a CLI may still
    # choose the interpreter after ``import colm_kernels``.
    if importlib.util.find_spec("triton") is None:  # pragma: no cover - triton is a dependency
        return "triton is not installed"
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
    return None


def cuda_unavailable_reason() -> str | None:
    from . import _cuda

    return _cuda.unavailable_reason()


def cuda_device_unavailable_reason() -> str | None:
    """For ``cuda`` kernels that come from PyTorch itself (fused SDPA, cuDNN) rather than from the
    compiled extension: only a CUDA device is needed."""
    return None if torch.cuda.is_available() else "no CUDA device"


_BACKEND_AVAILABILITY: dict[str, Callable[[], str | None]] = {
    "reference": lambda: None,
    "triton": triton_unavailable_reason,
    "cuda": cuda_unavailable_reason,
}


def backend_unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine at all (None when it can)."""
    return _BACKEND_AVAILABILITY[_check_name(name)]() if name != "auto" else None


def device_reasons(backend: str, tensors: Sequence[torch.Tensor]) -> list[str]:
    """Reasons shared by every op: which devices and dtypes a kernel backend accepts."""
    if backend == "reference":
        return []
    reasons = []
    devices = {t.device.type for t in tensors}
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if backend == "triton":
        allowed = {"cuda", "cpu"} if triton_interpret() else {"cuda"}
        bad = devices - allowed
        if bad:
            hint = "" if triton_interpret() else " (TRITON_INTERPRET=1 runs it on CPU tensors)"
            reasons.append(f"triton runs on CUDA tensors{hint}, got device {sorted(bad)}")
    elif backend == "cuda" and devices != {"cuda"}:
        reasons.append(f"cuda runs on CUDA tensors, got device {sorted(devices)}")
    bad_dtypes = sorted(str(d) for d in dtypes if d not in TRITON_DTYPES)
    if bad_dtypes:
        reasons.append(f"{backend} supports float16/bfloat16/float32, got {bad_dtypes}")
    return reasons


# -- per-op implementations -----------------------------------------------------------------
@dataclasses.dataclass
class Implementation:
    """One backend of one op. ``module`` is imported on first use (nothing heavy at import)."""

    op: str
    backend: str
    module: str
    # Name in ``module`` of the op's function (a registered custom op) for this backend.
    fn: str
    # Name in ``module`` of ``f(**inputs) -> list[str]``: op-specific reasons it cannot run.
    reasons_fn: str | None = None
    # Why this implementation cannot run on this machine at all; the backend's check by default
    # (a ``cuda`` implementation built on PyTorch's own kernels needs no compiled extension).
    availability: Callable[[], str | None] | None = None
    _module: object = dataclasses.field(default=None, repr=False)

    def load(self):
        # Cached: under torch.compile only an attribute read is traced, never an import.
        if self._module is None:
            self._module = importlib.import_module(self.module, package=__package__)
        return self._module

    def function(self) -> Callable:
        return getattr(self.load(), self.fn)

    def unavailable_reason(self) -> str | None:
        return (self.availability or _BACKEND_AVAILABILITY[self.backend])()

    def not_supported_reasons(self, tensors: Sequence[torch.Tensor], **inputs) -> list[str]:
        reason = self.unavailable_reason()
        if reason:
            return [reason]
        reasons = device_reasons(self.backend, tensors)
        if self.reasons_fn and inputs:  # without inputs: is the backend usable here at all
            reasons += getattr(self.load(), self.reasons_fn)(**inputs)
        return reasons


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# op -> its bounds module: ``bounds(**inputs) -> {backend: auto_bounds.Bound}`` and
# ``shape_class(**inputs) -> str`` (the key of measured timings)
_BOUNDS: dict[str, "_LazyModule"] = {}


@dataclasses.dataclass
class _LazyModule:
    name: str
    _module: object = dataclasses.field(default=None, repr=False)

    def load(self):
        # Cached, as Implementation.load: a torch.compile trace only reads an attribute.
        if self._module is None:
            self._module = importlib.import_module(self.name)
        return self._module


def register(op: str, backend: str, module: str, fn: str, reasons_fn: str | None = None,
             availability: Callable[[], str | None] | None = None) -> None:
    """Declare that ``module`` (imported lazily; absolute, or relative to this package) implements
    ``op``; ``availability`` replaces the backend's own machine check (see ``Implementation``)."""
    _check_name(backend)
    _REGISTRY.setdefault(op, {})[backend] = Implementation(op, backend, module, fn, reasons_fn, availability)


def register_bounds(op: str, module: str) -> None:
    """Declare ``module`` (imported on first use) as ``op``'s bounds: its ``bounds(**inputs)`` gives
    each backend's ``auto_bounds.Bound`` and ``shape_class(**inputs)`` the timing-table key."""
    _BOUNDS[op] = _LazyModule(module)


def bounds_module(op: str):
    """``op``'s bounds module (see ``register_bounds``); ``KeyError`` for an op without one."""
    return _BOUNDS[op].load()


def registered(op: str) -> dict[str, Implementation]:
    return dict(_REGISTRY.get(op, {}))


def ops() -> list[str]:
    return sorted(_REGISTRY)


def preload_available() -> None:
    """Import the modules of every backend that can run on this machine, so that tracing
    (``torch.compile``) never meets an import; unavailable backends are never imported."""
    for impls in _REGISTRY.values():
        for impl in impls.values():
            if impl.unavailable_reason() is None:
                impl.load()
    for bounds in _BOUNDS.values():
        bounds.load()


def select(op: str, tensors: Sequence[torch.Tensor], **inputs) -> str:
    """The backend that will run ``op`` on these inputs, or ``BackendError`` with every reason."""
    impls = _REGISTRY[op]
    name = get_backend(op)
    if name != "auto":
        impl = impls.get(name)
        if impl is None:
            raise BackendError(
                f"{op}: backend {name!r} has no implementation of this op "
                f"(implemented: {sorted(impls)})"
            )
        reasons = impl.not_supported_reasons(tensors, **inputs)
        if reasons:
            raise BackendError(f"{op}: backend {name!r} cannot run these inputs: " + "; ".join(reasons))
        return name
    return explain(op, tensors, **inputs).backend


def explain(op: str, tensors: Sequence[torch.Tensor], **inputs):
    """``auto``'s choice for these inputs and why (an ``auto_bounds.Choice``), whatever backend is
    selected; ``BackendError`` with every reason when no backend can run them."""
    impls = _REGISTRY[op]
    on_cuda = any(t.is_cuda for t in tensors)
    candidates, tried = [], []
    for candidate in _AUTO_ORDER_CUDA if on_cuda else _AUTO_ORDER_CPU:
        impl = impls.get(candidate)
        if impl is None:
            continue
        reasons = impl.not_supported_reasons(tensors, **inputs)
        if reasons:
            tried.append(f"{candidate}: " + "; ".join(reasons))
        else:
            candidates.append(candidate)
    if not candidates:
        raise BackendError(f"{op}: no backend can run these inputs. " + " | ".join(tried))
    if len(candidates) > 1 and candidates[-1] == "reference":
        candidates.pop()  # the eager reference is the last resort, never a rival of a kernel
    bounds, timings = {}, None
    if len(candidates) > 1 and op in _BOUNDS:
        module = _BOUNDS[op].load()
        bounds = module.bounds(**inputs)
        if auto_bounds.timings_path():
            timings = auto_bounds.load_timings(op, module.shape_class(**inputs))
    return auto_bounds.choose(candidates, bounds, timings)


def dispatch(op: str, tensors: Sequence[torch.Tensor], **inputs) -> Callable:
    """The function of the backend that ``select`` picks."""
    return _REGISTRY[op][select(op, tensors, **inputs)].function()
