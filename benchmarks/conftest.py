"""pytest-benchmark suites: the cases of ``colm_kernels.bench.ops``, timed with CUDA syncs.

Run on a GPU: ``pytest benchmarks --benchmark-group-by=param:case_id``. Without CUDA every
benchmark skips (timings need a GPU; ``colm-bench`` runs the CPU correctness checks instead).
"""
import pytest
import torch


@pytest.fixture
def cuda_benchmark(benchmark):
    """``benchmark`` whose every round ends with a CUDA synchronize (kernels are asynchronous)."""
    def run(fn):
        def synced():
            out = fn()
            torch.cuda.synchronize()
            return out
        for _ in range(3):  # warm-up: compilation and autotuning stay out of the timing
            synced()
        return benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)
    return run
