"""Benchmark ``multi_chain_cross_entropy`` against its peers (providers and sizes: ``colm_kernels.bench.ops``)."""
from harness import cases_for


@cases_for("multi_chain_cross_entropy")
def test_multi_chain_cross_entropy(case, cuda_benchmark):
    cuda_benchmark(case.run)
