"""The compiled CUDA extension ``colm_kernels._C``: load it if it can be used, else say why.

``setup.py`` builds ``colm_kernels._C`` only when torch has CUDA and nvcc is found (or
``COLM_KERNELS_FORCE_CUDA=1``); a CPU-only install has no extension at all. Importing
``colm_kernels`` never needs it: callers ask here, and the ``cuda`` backend reports
``unavailable_reason()`` instead of failing at import.

    load_extension()      -> the ``colm_kernels._C`` module, or None when it cannot be used
    unavailable_reason()  -> None when usable, else one line saying why
    is_available()        -> unavailable_reason() is None

The answer is computed once per process (torch and the extension are imported on first call) and
kept in a module global: ``torch.compile`` then reads it as a constant (it would trace through an
``lru_cache`` wrapper into the import and break the graph). ``colm_kernels.ops`` computes it at
import (``backends.preload_available``), before any tracing.
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTENSION_NAME = "colm_kernels._C"

NOT_BUILT = f"{EXTENSION_NAME} is not built (CPU torch or no nvcc at install time)"
NO_DEVICE = "no CUDA device"


_probed: tuple[ModuleType | None, str | None] | None = None


def _probe() -> tuple[ModuleType | None, str | None]:
    global _probed
    if _probed is None:
        _probed = _probe_once()
    return _probed


def _probe_once() -> tuple[ModuleType | None, str | None]:
    try:
        import torch  # the extension links against libtorch: import torch first
    except Exception as exc:  # pragma: no cover - torch is a dependency
        return None, f"torch is not importable ({type(exc).__name__}: {exc})"
    try:
        module = importlib.import_module(EXTENSION_NAME)
    except ModuleNotFoundError as exc:
        if exc.name == EXTENSION_NAME:
            return None, NOT_BUILT
        return None, f"{EXTENSION_NAME} failed to import ({type(exc).__name__}: {exc})"
    except ImportError as exc:
        # undefined symbols / missing libcudart: built against another torch or CUDA
        return None, (
            f"{EXTENSION_NAME} failed to import; was it built against another torch or CUDA? "
            f"Rebuild with `pip install -e . --no-build-isolation` ({exc})"
        )
    if torch.version.cuda is None:
        return None, f"{EXTENSION_NAME} is built but this torch {torch.__version__} has no CUDA"
    if not torch.cuda.is_available():
        return None, NO_DEVICE
    return module, None


def load_extension() -> ModuleType | None:
    """``colm_kernels._C`` when it is built, importable and a CUDA device is present, else None."""
    return _probe()[0]


def unavailable_reason() -> str | None:
    """Why ``load_extension()`` returns None (one line), or None when the extension is usable."""
    return _probe()[1]


def is_available() -> bool:
    return _probe()[1] is None


def require_extension() -> ModuleType:
    """The extension, or ``RuntimeError`` naming the reason it cannot be used."""
    module, reason = _probe()
    if module is None:
        raise RuntimeError(f"colm_kernels CUDA backend is unavailable: {reason}")
    return module


_functions_reason: dict[tuple[str, ...], str | None] = {}  # plain dict: torch.compile reads it


def functions_unavailable_reason(op: str, names: tuple[str, ...]) -> str | None:
    """Why ``op``'s extension functions ``names`` cannot be used (None when they can): the
    extension is unavailable, or was built from sources without them. Computed once."""
    if names not in _functions_reason:
        reason = unavailable_reason()
        if reason is None:
            missing = [n for n in names if not hasattr(load_extension(), n)]
            if missing:
                reason = (f"{EXTENSION_NAME} was built without {op} ({', '.join(missing)} missing): "
                          "rebuild with `pip install -e . --no-build-isolation`")
        _functions_reason[names] = reason
    return _functions_reason[names]
