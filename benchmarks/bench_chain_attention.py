"""Benchmark ``chain_attention`` against its peers (providers and sizes: ``colm_kernels.bench.ops``)."""
from harness import cases_for


@cases_for("chain_attention")
def test_chain_attention(case, cuda_benchmark):
    cuda_benchmark(case.run)
