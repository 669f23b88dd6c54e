"""Benchmark ``chain_swiglu`` against its peers (providers and sizes: ``colm_kernels.bench.ops``)."""
from harness import cases_for


@cases_for("chain_swiglu")
def test_chain_swiglu(case, cuda_benchmark):
    cuda_benchmark(case.run)
