"""Benchmark ``chain_rmsnorm`` against its peers (providers and sizes: ``colm_kernels.bench.ops``)."""
from harness import cases_for


@cases_for("chain_rmsnorm")
def test_chain_rmsnorm(case, cuda_benchmark):
    cuda_benchmark(case.run)
