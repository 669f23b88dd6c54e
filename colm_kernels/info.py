"""``python -m colm_kernels.info``: versions, GPU, and which backend runs which op (or why not)."""
from __future__ import annotations

import importlib
import platform

import torch

from . import backends
from . import ops  # noqa: F401  (registers every op's backends)


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # an optional dependency: say why it is missing
        return f"not available ({type(exc).__name__})"


def report() -> str:
    from . import __version__

    lines = [
        f"colm_kernels {__version__}",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton       {_version('triton')}",
        f"numpy        {_version('numpy')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}        {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("gpu          none")
    lines.append(f"backend      {backends.get_backend()} (set_backend / use_backend / COLM_KERNELS_BACKEND)")
    lines.append("")
    lines.append("backends:")
    for name in ("reference", "triton", "cuda"):
        reason = backends.backend_unavailable_reason(name)
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    lines.append("")
    lines.append("ops (backends with a kernel for the op):")
    for op in backends.ops():
        impls = backends.registered(op)
        cells = []
        for name in ("cuda", "triton", "reference"):
            if name not in impls:
                cells.append(f"{name}: no kernel yet")
            else:  # an implementation may carry its own check (cuda attention needs no extension)
                reason = impls[name].unavailable_reason()
                cells.append(f"{name}: {'yes' if reason is None else 'unavailable'}")
        lines.append(f"  {op:<27} " + " | ".join(cells))
    lines.append("")
    lines.append("auto on CUDA tensors, an H100 with every backend built (lowest roofline bound; "
                 "COLM_KERNELS_AUTO_TIMINGS: measured):")
    from .auto_cases import auto_choices

    for row in auto_choices():
        lines.append(f"  {row['op']:<23} {row['shape']}")
        lines.append(f"  {'':<23}   -> {row['backend']}: {row['why']}")
    if not torch.cuda.is_available():
        lines.append("  (this machine has no CUDA device: auto runs the reference backend here)")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
