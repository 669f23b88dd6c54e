"""Benchmark ``chain_linear`` against its peers (providers and sizes: ``colm_kernels.bench.ops``)."""
from harness import cases_for


@cases_for("chain_linear")
def test_chain_linear(case, cuda_benchmark):
    cuda_benchmark(case.run)
