"""Timing with Triton's benchmarking tools on a GPU, ``perf_counter`` on a CPU.

- ``do_bench`` (``triton.testing``): warm-up and repetitions sized in milliseconds, the L2 cache
  flushed before every repetition (cold-cache times, as a training step sees its weights), and
  quantiles of the per-call times.
- ``do_bench_cudagraph``: the calls captured in a CUDA graph and replayed, so launch overhead does
  not swamp kernels of a few microseconds (decode steps, norms). Used for forward-only passes that
  ask for it; a provider that cannot be captured (a host sync, a first-call compile) falls back to
  ``do_bench``, and the row says so: its method reads ``do_bench (graph capture failed)`` and
  ``capture_error`` holds the exception, never a silent fallback.

``measure`` returns a ``Timing`` (median and 20th / 80th percentiles in ms, and the method).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)
METHODS = ("do_bench", "do_bench_cudagraph", "perf_counter")
CAPTURE_FAILED = "do_bench (graph capture failed)"


@dataclasses.dataclass
class Timing:
    ms: float       # median
    ms_p20: float
    ms_p80: float
    method: str     # one of METHODS, or CAPTURE_FAILED
    capture_error: str = ""  # why a requested CUDA-graph capture failed (then timed by do_bench)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    deadline = time.perf_counter() + warmup_ms / 1e3
    fn()  # at least one warm-up call (compiles, autotunes)
    while time.perf_counter() < deadline:
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7], "perf_counter")


def measure(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0,
            rep_ms: float = 100.0, cudagraph: bool = False) -> Timing:
    """Time ``fn()``; ``cudagraph`` asks for CUDA-graph replay (GPU only)."""
    if device.type != "cuda":
        return _cpu(fn, warmup_ms, rep_ms)
    import triton.testing

    fn()  # first call outside any capture: compiles, autotunes, allocates
    synchronize(device)
    capture_error = ""
    if cudagraph:
        try:
            with torch.cuda.device(device):
                ms = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=list(QUANTILES))
            return Timing(*ms, method="do_bench_cudagraph")
        except Exception as exc:  # noqa: BLE001  capture failed: time it the ordinary way, and say so
            capture_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            synchronize(device)
    with torch.cuda.device(device):
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(*ms, method=CAPTURE_FAILED if capture_error else "do_bench", capture_error=capture_error)
