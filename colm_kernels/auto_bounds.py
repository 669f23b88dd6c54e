"""How ``auto`` chooses among kernel backends that can all run a call: by evidence.

Each op with more than one GPU backend has a ``bounds`` module (``ops/<op>/bounds.py``) that says,
for given inputs, what every backend would execute on an H100: tensor-core or CUDA-core FLOPs by
the kind of unit that runs them, and the bytes its kernels load and store in global memory (counted
the way the kernels are written: a kernel that re-reads a tile from global memory pays for it
again, even where L2 may serve it). The bound of a backend is its roofline time::

    max(sum(FLOPs of each kind / that kind's rate), bytes / HBM bandwidth)

``auto`` takes the backend with the lowest bound. Bounds within ``TIE`` of each other are a tie,
and a tie keeps the fixed order (``cuda`` before ``triton``): a bound is a model, not a timing.

A measured table replaces the bounds where it has an entry for every candidate of a call's shape
class: ``COLM_KERNELS_AUTO_TIMINGS=<path to a JSON file>``, as ``colm-bench`` writes it on a GPU
(``{"device": ..., "timings": [{"op", "shape_class", "backend", "ms"}, ...]}``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["H100", "TIE", "Bound", "Choice", "choose", "load_timings", "concrete", "concrete_shape", "needs_grad",
           "dtype_name", "pow2_bucket", "timings_path", "set_timings_path"]

# H100 SXM ceilings (FLOP/s, bytes/s). The 16-bit wgmma rate and HBM bandwidth are the measured
# ceilings the benchmarks report against (bench.report.H100_CEILINGS). The other units are scaled
# from the data sheet by the same measured/peak ratio (790 / 989): warp-level mma.sync reaches at
# most half of wgmma's rate on Hopper; TF32 tensor cores run at half the 16-bit rate; fp32 FMA on
# CUDA cores peaks at 67 TFLOP/s.
H100: Dict[str, float] = {
    "wgmma": 790e12,      # fp16 / bf16 warpgroup MMA
    "mma_sync": 395e12,   # fp16 / bf16 warp MMA (sm_80 code: flash-attn 2, small M tiles)
    "tf32": 395e12,       # fp32 inputs on tensor cores (TF32)
    "fp32_fma": 53.5e12,  # fp32 on CUDA cores (IEEE products, fp32 softmax)
    "hbm": 3.0e12,
}
TIE = 0.02  # bounds within 2% of the best are a tie


@dataclasses.dataclass(frozen=True)
class Bound:
    """What one backend executes for one call: FLOPs per unit kind, global-memory bytes."""

    flops: Mapping[str, float]
    bytes: float
    note: str = ""

    @property
    def compute_s(self) -> float:
        return sum(f / H100[kind] for kind, f in self.flops.items())

    @property
    def memory_s(self) -> float:
        return self.bytes / H100["hbm"]

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound_by(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def describe(self) -> str:
        kinds = "+".join(sorted(k for k, f in self.flops.items() if f))
        text = f"{1e6 * self.seconds:.1f} us ({self.bound_by}-bound"
        text += f", {kinds})" if kinds else ")"
        return text + (f": {self.note}" if self.note else "")


@dataclasses.dataclass(frozen=True)
class Choice:
    """``auto``'s pick among ``candidates`` (in fixed order), by ``rule``; ``why`` words it (built
    on demand: a torch.compile trace of a call only compares numbers)."""

    backend: str
    rule: str
    candidates: Tuple[str, ...] = ()
    bounds: Mapping[str, Bound] = dataclasses.field(default_factory=dict)
    timings_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def why(self) -> str:
        if self.rule == "measured":
            cells = ", ".join(f"{c} {self.timings_ms[c]:.4g} ms" for c in self.candidates)
            return f"measured on a GPU (COLM_KERNELS_AUTO_TIMINGS): {cells}"
        if self.rule in ("only", "unbounded"):
            return {"only": "the only backend that can run these inputs",
                    "unbounded": "fixed order (no bound for every candidate)"}[self.rule]
        cells = "; ".join(f"{c} {self.bounds[c].describe()}" for c in self.candidates)
        return f"{self.rule}: {cells}"


def choose(candidates: Sequence[str], bounds: Mapping[str, Bound],
           timings_ms: Optional[Mapping[str, float]] = None) -> Choice:
    """The candidate with the lowest measured time (when ``timings_ms`` has them all), else the
    lowest bound; ties keep ``candidates``' order."""
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("choose needs at least one candidate")
    if len(candidates) == 1:
        return Choice(candidates[0], "only", candidates, bounds)
    if timings_ms and all(c in timings_ms for c in candidates):
        best = min(candidates, key=lambda c: timings_ms[c])  # min keeps the first of equal times
        return Choice(best, "measured", candidates, bounds, timings_ms)
    if not all(c in bounds for c in candidates):
        return Choice(candidates[0], "unbounded", candidates, bounds)
    seconds = [bounds[c].seconds for c in candidates]
    limit = min(seconds) * (1 + TIE)
    tied = [c for c, t in zip(candidates, seconds) if t <= limit]
    rule = "tie within 2%, fixed order" if len(tied) > 1 else "lowest H100 roofline bound"
    return Choice(tied[0], rule, candidates, bounds)


def concrete(n) -> Optional[int]:
    """A size as an int, for a bound: a SymInt (torch.compile with dynamic shapes) gives its hint,
    so that choosing a backend adds no guard; None where there is no hint."""
    if isinstance(n, int):
        return n
    if isinstance(n, torch.SymInt):
        hint = getattr(n.node, "hint", None)
        return int(hint) if hint is not None else None
    return int(n)


def concrete_shape(t: torch.Tensor) -> Optional[Tuple[int, ...]]:
    dims = tuple(concrete(s) for s in t.shape)
    return None if any(d is None for d in dims) else dims


@functools.lru_cache(maxsize=4)
def _read_timings(path: str, mtime: float) -> Dict[Tuple[str, str], Dict[str, float]]:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("timings"), list):
        raise ValueError(f"COLM_KERNELS_AUTO_TIMINGS={path}: expected {{'device': ..., 'timings': [...]}}")
    table: Dict[Tuple[str, str], Dict[str, float]] = {}
    for i, row in enumerate(doc["timings"]):
        try:
            key, backend, ms = (str(row["op"]), str(row["shape_class"])), str(row["backend"]), float(row["ms"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"COLM_KERNELS_AUTO_TIMINGS={path}: timings[{i}] needs op, shape_class, "
                             f"backend and ms, got {row!r}") from e
        table.setdefault(key, {})[backend] = ms
    return table


# Read once at import (as COLM_KERNELS_BACKEND): a torch.compile trace then reads a constant.
_TIMINGS_PATH = os.environ.get("COLM_KERNELS_AUTO_TIMINGS") or None


def timings_path() -> Optional[str]:
    return _TIMINGS_PATH


def set_timings_path(path: Optional[str]) -> None:
    """Use the measured table at ``path`` (None: bounds only) from now on."""
    global _TIMINGS_PATH
    _TIMINGS_PATH = path or None


def load_timings(op: str, shape_class: Optional[str]) -> Optional[Dict[str, float]]:
    """Measured milliseconds per backend for ``op`` at ``shape_class`` from the table named by
    ``COLM_KERNELS_AUTO_TIMINGS`` or ``set_timings_path`` (None without one or without an entry)."""
    path = _TIMINGS_PATH
    if not path or shape_class is None:
        return None
    return _read_timings(path, os.path.getmtime(path)).get((op, shape_class))


def needs_grad(*tensors) -> bool:
    """Whether a call will also run its backward (the backend choice covers both passes)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def pow2_bucket(n: int) -> int:
    """``n`` rounded up to a power of two: the size bucket of a timing-table key."""
    return 1 << max(0, (n - 1).bit_length())
